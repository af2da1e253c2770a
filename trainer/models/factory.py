"""Backbone factory: torchvision classifiers plus a tiny ViT preset for CPU runs.

Models are plain torchvision modules (no wrappers), so their state-dict names
stay exactly those of ``torchvision.models.<arch>(num_classes=...)``; the
pruning code and the exported checkpoints rely on that.

``weights`` can be ``None``/"none", a torchvision weights name ("IMAGENET1K_V1",
"DEFAULT", "ResNet50_Weights.IMAGENET1K_V2") or a local checkpoint path. When
the checkpoint's class count differs from ``num_classes`` the classifier head
keeps its fresh initialisation and everything else is loaded.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from ..plan import has_weights  # torch-free (the stage plan needs it); re-exported by trainer.models

MODEL_NAMES = ("resnet18", "resnet50", "vgg16_bn", "vit_b_16", "vit_tiny")

# Per-socket-operation timeout for weight downloads: on a machine without
# internet a blackholed connection would otherwise hang the launcher forever.
DOWNLOAD_TIMEOUT_S = 20.0

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
_STRIP_PREFIXES = ("module.", "backbone.")  # DDP / wrapper-model prefixes


class ModelError(ValueError):
    """Bad model/weights request; str(e) is a one-line message for the user."""


def build_backbone(name: str, num_classes: int, image_size: int, weights: str | None = None) -> nn.Module:
    """Build ``name`` with a ``num_classes``-way head for ``image_size`` px inputs."""
    model = _build_arch(name, num_classes, image_size)
    if not has_weights(weights):
        return model
    weights = str(weights).strip()
    if _looks_like_path(weights):
        state, source = _load_local(weights), weights
    else:
        state, source = _load_torchvision(name, weights)
    _load_into(model, state, source)
    return model


def weights_num_classes(name: str, weights: str, image_size: int) -> int | None:
    """Outputs of the classifier stored in `weights` (None when the file holds no classifier)."""
    weights = str(weights).strip()
    if not _looks_like_path(weights):
        return len(_resolve_weights(name, weights).meta["categories"])
    head = classifier_name(_build_arch(name, 2, image_size))
    state = _load_local(weights)
    return state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else None


def is_torchvision_weights(weights: str | None) -> bool:
    """A torchvision weights name (ImageNet-trained), as opposed to a checkpoint path."""
    return has_weights(weights) and not _looks_like_path(str(weights).strip())


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final classification Linear ("fc", "classifier.6", "heads.head").

    It is the last Linear registered: in every supported architecture the head
    is registered after the feature extractor (also after Torch-Pruning, which
    edits modules in place).
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no Linear classifier head")
    return linears[-1]


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- building


def _build_arch(name: str, num_classes: int, image_size: int) -> nn.Module:
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ModelError(f"image_size must be a positive integer, got {image_size!r}")
    if name == "vit_tiny":
        # ~8x8 token grid keeps the sequence short enough for 2-core CPU training.
        if image_size % 8:
            raise ModelError(f"vit_tiny needs image_size divisible by 8 (patch = image_size // 8), got {image_size}")
        return VisionTransformer(
            image_size=image_size, patch_size=image_size // 8, num_layers=6, num_heads=3,
            hidden_dim=192, mlp_dim=768, num_classes=num_classes,
        )
    if name == "vit_b_16":
        if image_size % 16:
            raise ModelError(f"vit_b_16 needs image_size divisible by 16 (patch size 16), got {image_size}")
        return torchvision.models.vit_b_16(weights=None, image_size=image_size, num_classes=num_classes)
    # CNNs end in adaptive pooling, so any input size works.
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


# --------------------------------------------------------------------------- weights sources


def _looks_like_path(weights: str) -> bool:
    return (
        os.path.exists(os.path.expanduser(weights))
        or os.sep in weights
        or "/" in weights
        or weights.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _load_local(path: str) -> dict:
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise ModelError(f"checkpoint file not found: {path}")
    try:
        # weights_only: a checkpoint path must not be able to run code.
        ckpt = torch.load(full, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"could not read checkpoint {path}: {_one_line(e)}") from e
    for key in ("model", "state_dict"):  # our/Lightning-style training checkpoints
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ModelError(f"checkpoint {path} holds no state dict (plain, or under 'model'/'state_dict')")
    return {_strip_prefixes(k): v for k, v in ckpt.items()}


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:  # handles stacked wrappers such as "module.backbone.fc.weight"
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _resolve_weights(arch: str, weights: str):
    if arch == "vit_tiny":
        raise ModelError(f"vit_tiny has no torchvision weights ({weights!r}); pass a local checkpoint path or 'none'")
    enum = torchvision.models.get_model_weights(arch)
    valid = ", ".join(enum.__members__)
    enum_name, _, member = weights.rpartition(".")
    member = member.upper()
    if (not enum_name or enum_name == enum.__name__) and member in enum.__members__:
        return enum[member]
    raise ModelError(
        f"unknown weights {weights!r} for {arch}; valid: none, {valid} "
        f"(optionally prefixed '{enum.__name__}.'), or a checkpoint file path"
    )


def _load_torchvision(arch: str, weights: str) -> tuple[dict, str]:
    w = _resolve_weights(arch, weights)
    source = f"{type(w).__name__}.{w.name}"
    filename = os.path.basename(urlparse(w.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)  # torchvision's own cache
    if not os.path.isfile(path):
        try:
            _download(w.url, path)
        except Exception as e:
            raise ModelError(
                f"weights {source} are not cached and could not be downloaded ({_one_line(e)}); "
                f"fetch {w.url} and put the file at {path}"
            ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True), source
    except Exception as e:
        raise ModelError(f"cached weights file {path} is unreadable ({_one_line(e)}); delete it and retry") from e


def _download(url: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))  # torchvision names carry a sha256 prefix
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urlopen inside torch.hub takes no timeout argument
    try:
        # Writes to a .partial file and renames, so a failure never leaves a broken cache entry.
        torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None, progress=True)
    finally:
        socket.setdefaulttimeout(old)


# --------------------------------------------------------------------------- loading


def _load_into(model: nn.Module, state: dict, source: str) -> None:
    state = dict(state)
    own = model.state_dict()

    if isinstance(model, VisionTransformer):
        pos = state.get("encoder.pos_embedding")
        if pos is not None and pos.shape != own["encoder.pos_embedding"].shape:
            # Pretrained at another resolution (e.g. 224 px): resample the position grid.
            try:
                state = dict(interpolate_embeddings(model.image_size, model.patch_size, state))
            except ValueError as e:
                raise ModelError(f"weights {source}: cannot resize position embeddings ({_one_line(e)})") from e

    # A head trained for another class count is dropped: the model's fresh head stays.
    head = classifier_name(model)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        for k in head_keys:
            state.pop(k, None)

    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3])
        raise ModelError(f"weights {source} do not fit {type(model).__name__}: shape mismatch in {detail}{_more(mismatched)}")

    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{_more(missing)}")
        if result.unexpected_keys:
            unexpected = result.unexpected_keys
            parts.append(f"unexpected {', '.join(unexpected[:3])}{_more(unexpected)}")
        raise ModelError(f"weights {source} do not fit {type(model).__name__}: {'; '.join(parts)}")


def _more(keys: list) -> str:
    return f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())

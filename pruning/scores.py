"""Per-weight score masks for unstructured sparsity (METHODS.md section 3: VPNs, HYDRA).

Every scored weight `W` gets a score tensor `S` of the same shape, registered
on the same module as `<name>_score` (so `conv1.weight` keeps its name and
gains `conv1.weight_score`; the torchvision module keeps its class and
structure). During the module's forward, `W` is replaced by `W * M` with

    M = 1[|S| > tau],   tau = k-th smallest |S| over all scored layers,
    k = floor((1 - density) * N)

(`threshold="layer"`: the same per layer). Exactly `N - k` weights are kept:
ties at the threshold are broken by position, so the achieved density meets
the target to the weight. The mask is recomputed whenever a score changes (an
optimizer step, a checkpoint load), i.e. after every optimizer step, before
the next forward. The backward is straight-through: d loss / d S gets the
gradient of the mask entry, through |S| (the sign of S), as in HYDRA/VPNs.

Scored: the `weight` of every `Conv2d` and `Linear`, and the fused q/k/v
projection `in_proj_weight` of `nn.MultiheadAttention` (its output projection
is already a `Linear`, though one the attention module reads directly, so its
substitution hooks sit on the attention module). `exclude_first` skips the
first such layer (the stem conv, or ViT's patch embedding),
`exclude_classifier` the last `Linear`.

`FixedMasks` is the finetune side: it zeroes the masked weights once and
masks their gradients, so they stay exactly zero under SGD and Adam(W) and
the forward costs nothing extra.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

SCORE_SUFFIX = "_score"
THRESHOLDS = ("global", "layer")


@dataclass(frozen=True)
class ScoredWeight:
    module_name: str     # dotted module path ("layer1.0.conv1")
    param_name: str      # "weight" or "in_proj_weight"
    module: nn.Module
    reader: nn.Module    # the module whose forward reads the weight (MultiheadAttention reads out_proj's)

    @property
    def key(self) -> str:
        """The weight's state-dict key."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def weight(self) -> torch.Tensor:
        return self.module._parameters[self.param_name]


def scorable_weights(model: nn.Module, *, exclude_first: bool = False,
                     exclude_classifier: bool = False) -> list[ScoredWeight]:
    """The weights VPNs scores, in registration order (the classifier is the last `Linear`)."""
    # nn.MultiheadAttention passes out_proj.weight to its functional forward without calling out_proj.
    readers = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            found.append(ScoredWeight(name, "weight", module, readers.get(id(module), module)))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            found.append(ScoredWeight(name, "in_proj_weight", module, module))
    if not found:
        raise ValueError(f"{type(model).__name__} has no Conv2d/Linear weights to score")
    linears = [i for i, w in enumerate(found) if isinstance(w.module, nn.Linear)]
    drop = set()
    if exclude_first:
        drop.add(0)
    if exclude_classifier and linears:
        drop.add(linears[-1])
    kept = [w for i, w in enumerate(found) if i not in drop]
    if not kept:
        raise ValueError("excluding the first layer and the classifier leaves no weights to score")
    return kept


def pruned_count(n: int, density: float) -> int:
    """k = floor((1 - density) * n): how many of n weights are masked.

    Computed on the decimal the density was written as (0.9, not 0.9000000000000000222),
    so that 1 - 0.9 is exactly 0.1 and the kept count is exactly ceil(density * n).
    """
    return min(n, max(0, math.floor((1 - Fraction(repr(float(density)))) * n)))


def _keep_top_flat(values: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping exactly n - k of the largest values (ties broken by position)."""
    n = values.numel()
    k = pruned_count(n, density)
    if k == 0:
        return torch.ones_like(values, dtype=torch.bool)
    if k == n:
        return torch.zeros_like(values, dtype=torch.bool)
    tau = values.kthvalue(k).values
    keep = values > tau
    deficit = (n - k) - int(keep.sum())
    if deficit > 0:  # ties at tau: keep the first ones so the count is exact
        ties = (values == tau).nonzero().flatten()[:deficit]
        keep[ties] = True
    return keep


def keep_top(values: list[torch.Tensor], density: float, threshold: str = "global") -> list[torch.Tensor]:
    """Masks keeping the largest `values`: one global threshold over all tensors, or one per tensor."""
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold {threshold!r}: choose from {', '.join(THRESHOLDS)}")
    if threshold == "layer":
        return [_keep_top_flat(v.reshape(-1), density).view(v.shape) for v in values]
    flat = torch.cat([v.reshape(-1) for v in values])
    keep = _keep_top_flat(flat, density)
    return [part.view(v.shape) for part, v in zip(keep.split([v.numel() for v in values]), values)]


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard mask. Backward: the mask's gradient passed to the scores unchanged."""

    @staticmethod
    def forward(ctx, scores_abs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(scores_abs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def initial_scores(weight: torch.Tensor) -> torch.Tensor:
    """sqrt(6 / fan_in) * W / max|W| (per layer)."""
    w = weight.detach()
    fan_in = w[0].numel()
    return math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(torch.finfo(w.dtype).tiny)


class ScoreMasks:
    """Attach trainable scores to a model's weights; its forward then uses the masked weights."""

    def __init__(self, model: nn.Module, density: float, *, threshold: str = "global",
                 exclude_first: bool = False, exclude_classifier: bool = False):
        if not 0 < density <= 1:
            raise ValueError(f"density {density}: must be in (0, 1]")
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold {threshold!r}: choose from {', '.join(THRESHOLDS)}")
        self.density, self.threshold = density, threshold
        self.weights = scorable_weights(model, exclude_first=exclude_first, exclude_classifier=exclude_classifier)
        self._cache_key, self._masks = None, None
        # Every optimizer step counts as a change: DeepSpeed writes its updated weights back through
        # `.data`, which no version counter sees.
        self._steps = 0
        self._handles = [register_optimizer_step_post_hook(self._count_step)]
        for i, w in enumerate(self.weights):
            w.module.register_parameter(w.param_name + SCORE_SUFFIX, nn.Parameter(initial_scores(w.weight)))
            self._handles.append(w.reader.register_forward_pre_hook(partial(self._use_masked_weight, i)))
            self._handles.append(w.reader.register_forward_hook(partial(self._restore_weight, i), always_call=True))

    # scores and masks ------------------------------------------------------
    def scores(self) -> list[nn.Parameter]:
        return [w.module._parameters[w.param_name + SCORE_SUFFIX] for w in self.weights]

    def _count_step(self, optimizer, args, kwargs) -> None:
        self._steps += 1

    def masks(self) -> list[torch.Tensor]:
        """The current hard masks (bool), recomputed only when a score tensor changed.

        "Changed": an optimizer step was taken, or a score's storage or in-place version counter
        moved (`copy_`, `load_state_dict`); edits through `.data` alone are not seen. Under ZeRO-3
        (scores sharded between forwards) the global threshold needs every score: they are
        gathered the way DeepSpeed intends, and the storage is not part of the key (it is new
        at every gather).
        """
        scores = self.scores()
        sharded = any(hasattr(s, "ds_id") for s in scores)
        key = (self._steps, None if sharded else tuple((s.data_ptr(), s._version) for s in scores))
        if key != self._cache_key:
            with torch.no_grad(), _gathered(scores if sharded else []):
                self._masks = keep_top([s.detach().abs() for s in scores], self.density, self.threshold)
            self._cache_key = key
        return self._masks

    def masks_by_key(self) -> dict[str, torch.Tensor]:
        return {w.key: m for w, m in zip(self.weights, self.masks())}

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks()))

    def total(self) -> int:
        return sum(w.weight.numel() for w in self.weights)

    # the forward substitution ---------------------------------------------
    def _use_masked_weight(self, i: int, reader: nn.Module, args) -> None:
        w = self.weights[i]
        mask = self.masks()[i]
        score = w.module._parameters[w.param_name + SCORE_SUFFIX]
        # An instance attribute shadows the registered parameter while the reader runs:
        # the parameter itself (its name, state dict, optimizer entry) is untouched.
        w.module.__dict__[w.param_name] = w.weight * _StraightThrough.apply(score.abs(), mask)

    def _restore_weight(self, i: int, reader: nn.Module, args, output) -> None:
        w = self.weights[i]
        w.module.__dict__.pop(w.param_name, None)

    def remove(self) -> dict[str, torch.Tensor]:
        """Detach hooks and scores from the model; returns the final masks by weight key."""
        final = {k: m.cpu() for k, m in self.masks_by_key().items()}
        for h in self._handles:
            h.remove()
        for w in self.weights:
            del w.module._parameters[w.param_name + SCORE_SUFFIX]
            w.module.__dict__.pop(w.param_name, None)
        self._handles = []
        return final


def _gathered(params: list[torch.Tensor]):
    """DeepSpeed ZeRO-3: the whole of the given sharded parameters for the duration (read-only)."""
    if not params:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus
    return GatheredParameters([p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE])


def resolve_weight(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, param_name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if param_name not in module._parameters:
        raise KeyError(f"{key}: no such parameter")
    return module, param_name


def zero_masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Set the masked entries of every masked weight to zero; returns (weight, mask on its device) pairs."""
    pairs = []
    for key, mask in masks.items():
        module, name = resolve_weight(model, key)
        weight = module._parameters[name]
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask for {key} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        with torch.no_grad():
            weight.mul_(mask)
        pairs.append((weight, mask))
    return pairs


class FixedMasks:
    """Keep masked weights at exactly zero while the rest trains (finetune with a fixed mask)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        # The gradient of a masked entry is zero, so momentum and weight decay never move it.
        self._handles = [weight.register_hook(partial(_mask_gradient, mask))
                         for weight, mask in zero_masked(model, masks)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _mask_gradient(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * mask


def density_report(masks: dict[str, torch.Tensor]) -> dict:
    """Achieved density overall and per layer, with the counts behind it."""
    kept = {k: int(m.sum()) for k, m in masks.items()}
    sizes = {k: m.numel() for k, m in masks.items()}
    total = sum(sizes.values())
    return {"kept": sum(kept.values()), "total": total, "density": sum(kept.values()) / max(1, total),
            "per_layer": {k: kept[k] / sizes[k] for k in masks}}


def magnitude_masks(weights: list[ScoredWeight], density: float, threshold: str = "global") -> dict[str, torch.Tensor]:
    """OMP: keep the largest |W| (one-shot global magnitude pruning)."""
    masks = keep_top([w.weight.detach().abs() for w in weights], density, threshold)
    return {w.key: m.cpu() for w, m in zip(weights, masks)}


def random_masks(weights: list[ScoredWeight], density: float, seed: int) -> dict[str, torch.Tensor]:
    """Uniformly random weights, exactly ceil(density * N) of them over all scored layers."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.rand(w.weight.shape, generator=gen) for w in weights]
    return {w.key: m for w, m in zip(weights, keep_top(values, density, "global"))}

"""Tests for trainer.models.factory: building, weights resolution, checkpoint loading.

Everything is offline: torchvision "pretrained" files are fabricated in a tmp
TORCH_HOME, and the download path is exercised against unreachable servers.
"""

import os
import socket
import time

import pytest
import torch
import torchvision
from torch import nn

from trainer.models import factory
from trainer.models.factory import MODEL_NAMES, ModelError, build_backbone, classifier_name, count_parameters

SIZES = {"resnet18": 32, "resnet50": 32, "vgg16_bn": 32, "vit_b_16": 32, "vit_tiny": 32}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # an earlier set_dir() would override TORCH_HOME
    return tmp_path / "torch_home"


def _cache_path(torch_home, weights):
    return torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_builds_with_requested_classes(name):
    size = SIZES[name]
    model = build_backbone(name, num_classes=10, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    head = model.get_submodule(classifier_name(model))
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0


def test_classifier_names_and_torchvision_compatible_state_dict():
    assert classifier_name(build_backbone("resnet18", 10, 32)) == "fc"
    assert classifier_name(build_backbone("vit_tiny", 10, 64)) == "heads.head"
    # Exported state dicts must load into the stock torchvision constructor.
    model = build_backbone("resnet18", 10, 32)
    torchvision.models.resnet18(num_classes=10).load_state_dict(model.state_dict())


def test_vit_tiny_uses_8x8_token_grid():
    model = build_backbone("vit_tiny", 10, 64)
    assert model.patch_size == 8 and model.seq_length == 8 * 8 + 1
    assert model.hidden_dim == 192 and len(model.encoder.layers) == 6


def test_unknown_model_lists_choices():
    with pytest.raises(ModelError, match="unknown model 'resnet19'") as err:
        build_backbone("resnet19", 10, 32)
    assert all(n in str(err.value) for n in MODEL_NAMES)


@pytest.mark.parametrize("name,size,needed", [("vit_b_16", 40, "16"), ("vit_tiny", 36, "8")])
def test_bad_image_size(name, size, needed):
    with pytest.raises(ModelError, match=f"{name} needs image_size divisible by {needed}.*got {size}"):
        build_backbone(name, 10, size)


def test_unknown_weights_name_lists_valid_names():
    with pytest.raises(ModelError) as err:
        build_backbone("resnet50", 10, 32, weights="IMAGENET22K")
    msg = str(err.value)
    assert "IMAGENET22K" in msg and "IMAGENET1K_V1" in msg and "IMAGENET1K_V2" in msg and "\n" not in msg
    # A full name from another architecture is not silently accepted.
    with pytest.raises(ModelError, match="unknown weights"):
        build_backbone("resnet18", 10, 32, weights="ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(ModelError, match="vit_tiny has no torchvision weights"):
        build_backbone("vit_tiny", 10, 32, weights="IMAGENET1K_V1")


def test_uncached_weights_error_names_url_and_cache_path(torch_home, monkeypatch):
    monkeypatch.setattr(factory, "DOWNLOAD_TIMEOUT_S", 2.0)
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    start = time.monotonic()
    try:
        build_backbone("resnet18", 10, 32, weights="IMAGENET1K_V1")
    except ModelError as e:
        msg = str(e)
    else:
        pytest.skip("this machine can reach download.pytorch.org")
    assert time.monotonic() - start < 10
    assert "not cached" in msg and w.url in msg and str(_cache_path(torch_home, w)) in msg and "\n" not in msg
    assert not list(_cache_path(torch_home, w).parent.glob("*")), "no partial file may be left behind"


def test_download_cannot_hang(torch_home, monkeypatch):
    # A server that accepts the connection but never answers: the socket timeout must fire.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/fake-0123abcd.pth"

    class FakeWeights:
        name = "FAKE"

    FakeWeights.url = url
    monkeypatch.setattr(factory, "_resolve_weights", lambda arch, weights: FakeWeights())
    monkeypatch.setattr(factory, "DOWNLOAD_TIMEOUT_S", 1.0)
    start = time.monotonic()
    try:
        with pytest.raises(ModelError, match="not cached") as err:
            build_backbone("resnet18", 10, 32, weights="FAKE")
    finally:
        server.close()
    assert time.monotonic() - start < 10
    assert url in str(err.value)
    assert socket.getdefaulttimeout() is None  # the global timeout is restored


def test_cached_weights_load_and_head_adapts(torch_home):
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    saved = torchvision.models.resnet18().state_dict()  # 1000-way, like the real file
    path = _cache_path(torch_home, w)
    path.parent.mkdir(parents=True)
    torch.save(saved, path)

    model = build_backbone("resnet18", num_classes=10, image_size=32, weights="IMAGENET1K_V1")
    assert model.fc.out_features == 10
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, saved[k]), k
    # The full enum spelling and DEFAULT resolve to the same cached file.
    for spelling in ("ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"):
        other = build_backbone("resnet18", 10, 32, weights=spelling)
        assert torch.equal(other.conv1.weight, saved["conv1.weight"])


def _assert_same(model, state):
    own = model.state_dict()
    assert own.keys() == state.keys()
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_local_checkpoint_round_trip(tmp_path):
    src = build_backbone("resnet18", 10, 32)
    state = src.state_dict()

    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    _assert_same(build_backbone("resnet18", 10, 32, weights=str(plain)), state)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}, wrapped)
    _assert_same(build_backbone("resnet18", 10, 32, weights=str(wrapped)), state)

    nested = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"module.backbone." + k: v for k, v in state.items()}}, nested)
    _assert_same(build_backbone("resnet18", 10, 32, weights=str(nested)), state)

    # Different class count: body loads, head is a fresh 5-way Linear.
    model = build_backbone("resnet18", 5, 32, weights=str(plain))
    assert model.fc.out_features == 5
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_local_checkpoint_for_wrong_architecture(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18", 10, 32).state_dict(), path)
    with pytest.raises(ModelError, match="do not fit VisionTransformer: missing .*unexpected") as err:
        build_backbone("vit_tiny", 10, 32, weights=str(path))
    assert "(+" in str(err.value)  # long key lists are truncated


def test_missing_checkpoint_path(tmp_path):
    missing = tmp_path / "nope" / "model.pth"
    with pytest.raises(ModelError, match="checkpoint file not found") as err:
        build_backbone("resnet18", 10, 32, weights=str(missing))
    assert str(missing) in str(err.value)


def test_vit_position_embeddings_are_interpolated():
    small = build_backbone("vit_tiny", 10, 32)
    # Same patch size (4), bigger grid: only the position embeddings need resampling.
    big = factory.VisionTransformer(image_size=64, patch_size=4, num_layers=6, num_heads=3,
                                    hidden_dim=192, mlp_dim=768, num_classes=10)
    factory._load_into(big, small.state_dict(), "test")
    assert big.encoder.pos_embedding.shape == (1, 16 * 16 + 1, 192)
    assert torch.equal(big.conv_proj.weight, small.conv_proj.weight)

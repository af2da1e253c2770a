"""Channel groups, FLOPs model, masking and physical extraction (pruning.graph/flops_model/masking/extract).

The expensive objects (a backbone, its PruneGraph and FlopsModel, and its
extractions) are built once per model and cached for the whole module, so the
model x ratio parametrisations only pay for what they check.

Random weights alone would make several comparisons trivial (torchvision
zero-initialises the ViT head, biases and position embedding, and BatchNorm
starts at identity), so `_randomise` perturbs all of those before anything is
compared.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pruning.attention import SelfAttention, convert_attention
from pruning.extract import BudgetError, choose_channels, extract, make_structure, rebuild
from pruning.flops_model import FlopsModel
from pruning.graph import build_graph
from pruning.masking import ChannelMasks
from trainer.models import build_backbone, classifier_name, count_macs

NUM_CLASSES = 10
RES = {"resnet50": 64, "vgg16_bn": 32, "vit_b_16": 32, "vit_tiny": 32}
MODELS = ("resnet50", "vgg16_bn", "vit_b_16")
RATIOS = (0.3, 0.5, 0.7)

_MODELS: dict[str, "Built"] = {}
_EXTRACTED: dict[tuple, "Extraction"] = {}


def _seed(*parts) -> int:
    return sum((i + 1) * sum(map(ord, str(p))) for i, p in enumerate(parts)) % (2 ** 31)


@torch.no_grad()
def _randomise(model: nn.Module) -> None:
    """Make every parameter/buffer that torchvision starts at 0/1 non-trivial."""
    head = classifier_name(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        elif isinstance(m, nn.LayerNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    for name, p in model.named_parameters():
        if name.startswith(head + "."):
            p.normal_(0.0, 0.05)
        elif name in ("class_token", "encoder.pos_embedding"):
            p.normal_(0.0, 0.5)
        elif name.endswith("bias") and p.dim() == 1 and not _is_norm_param(model, name):
            p.uniform_(-0.1, 0.1)


def _is_norm_param(model, name):
    owner = name.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), (nn.BatchNorm2d, nn.LayerNorm))


class Built:
    def __init__(self, name: str):
        torch.manual_seed(_seed(name))
        self.name, self.res = name, RES[name]
        self.model = build_backbone(name, NUM_CLASSES, self.res).eval()
        self.graph = build_graph(self.model, self.res)          # converts attention in place
        _randomise(self.model)
        self.flops = FlopsModel(self.model, self.graph, self.res)
        self.torch_dense = count_macs(self.model, self.res)
        self.x = torch.randn(2, 3, self.res, self.res, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.dense_out = self.model(self.x)


class Extraction:
    def __init__(self, built: Built, ratio: float):
        torch.manual_seed(_seed(built.name, ratio))
        g = built.graph
        self.scores = [torch.randn(s) for s in g.group_sizes()]
        self.kept = choose_channels(self.scores, built.flops, ratio)
        self.widths = [len(k) for k in self.kept]
        self.structure = make_structure(g, self.kept, arch=built.name, res=built.res,
                                        num_classes=NUM_CLASSES, flops=built.flops)
        self.small = extract(built.model, self.structure).eval()


def built(name: str) -> Built:
    if name not in _MODELS:
        _MODELS[name] = Built(name)
    return _MODELS[name]


def extraction(name: str, ratio: float) -> Extraction:
    key = (name, ratio)
    if key not in _EXTRACTED:
        _EXTRACTED[key] = Extraction(built(name), ratio)
    return _EXTRACTED[key]


@pytest.fixture(scope="module", autouse=True)
def _free_cache(one_thread):
    yield
    _MODELS.clear()
    _EXTRACTED.clear()


def _masks(graph, kept):
    return [torch.zeros(s).index_fill_(0, k, 1.0) for s, k in zip(graph.group_sizes(), kept)]


# --------------------------------------------------------------------------- 1. FLOPs


@pytest.mark.parametrize("name", MODELS)
def test_flops_model_matches_torch_count_dense(name):
    b = built(name)
    assert b.torch_dense > 0
    assert b.flops.dense == pytest.approx(b.torch_dense, rel=0.01)
    # all-kept widths reproduce the dense cost
    assert b.flops(b.graph.group_sizes()) == pytest.approx(b.flops.dense, rel=1e-12)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", MODELS)
def test_extracted_flops_meet_budget(name, ratio):
    b, e = built(name), extraction(name, ratio)
    # something was actually pruned, in several groups
    assert sum(w < s for w, s in zip(e.widths, b.graph.group_sizes())) >= 2
    torch_small = count_macs(e.small, b.res)
    torch_ratio = torch_small / b.torch_dense
    assert abs(torch_ratio / ratio - 1) <= 0.02, (torch_ratio, ratio)
    assert torch_ratio <= ratio * 1.01, (torch_ratio, ratio)
    # the project's FLOPs model agrees with torch on the extracted network
    assert e.structure["flops"] == pytest.approx(float(b.flops(e.widths)))
    assert e.structure["flops"] == pytest.approx(torch_small, rel=0.01)
    assert e.structure["flops_ratio"] <= ratio + 1e-12


# --------------------------------------------------------------------------- 2. masked == extracted


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", MODELS)
def test_masked_equals_extracted(name, ratio):
    b, e = built(name), extraction(name, ratio)
    masks = ChannelMasks(b.model, b.graph)
    try:
        masks.set(_masks(b.graph, e.kept))
        with torch.no_grad():
            masked = b.model(b.x)
    finally:
        masks.remove()
    with torch.no_grad():
        small = e.small(b.x)
        dense_again = b.model(b.x)
    assert torch.equal(dense_again, b.dense_out), "ChannelMasks.remove() must restore the dense network"
    assert torch.isfinite(masked).all() and torch.isfinite(small).all()
    scale = masked.abs().max().item()
    assert scale > 1e-3, f"output scale {scale} too small for a meaningful comparison"
    # masking changed the function (otherwise the comparison would not test the slicing)
    assert (masked - b.dense_out).abs().max().item() > 1e-3 * scale
    assert small.shape == masked.shape == (2, NUM_CLASSES)
    diff = (masked - small).abs().max().item()
    assert diff <= 1e-4 * scale, f"max |masked - extracted| = {diff:.3g}, output scale {scale:.3g}"
    assert sum(p.numel() for p in e.small.parameters()) < sum(p.numel() for p in b.model.parameters())


# --------------------------------------------------------------------------- 3a. residual=False


@pytest.mark.parametrize("name, residual_names", [
    ("resnet50", ["layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3", "layer4.0.conv3"]),
    ("vit_tiny", ["conv_proj"]),
])
def test_residual_false_drops_exactly_multi_producer_groups(name, residual_names):
    res = RES[name]
    full = built(name).graph
    plain = build_graph(build_backbone(name, NUM_CLASSES, res), res, residual=False)
    multi = [g.name for g in full.groups if len(g.producers) > 1]
    assert multi == residual_names
    assert [g.name for g in full.groups if g.residual] == residual_names
    assert not any(g.residual or len(g.producers) > 1 for g in plain.groups)

    def signature(g):
        return (g.name, g.size, g.kind, tuple(g.producers), tuple(g.consumers), tuple(g.norms), tuple(g.params))

    assert [signature(g) for g in plain.groups] == [signature(g) for g in full.groups if not g.residual]
    assert [g.index for g in plain.groups] == list(range(len(plain.groups)))
    # the layer table only refers to the remaining groups
    for slot in plain.layers.values():
        for gi in (slot.in_group, slot.out_group, slot.head_group):
            assert gi is None or 0 <= gi < len(plain.groups)
    if name == "vit_tiny":   # class token / position embedding belong to the dropped embedding stream
        assert plain.param_groups == {} and full.param_groups


# --------------------------------------------------------------------------- 3b. group order


def _first_call_order(model, res):
    order = {}

    def record(name):
        def hook(module, args):
            order.setdefault(name, len(order))   # returns None: the input is left alone
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, res, res))
    finally:
        for h in handles:
            h.remove()
    return order


def _assert_execution_order(model, graph, res):
    order = _first_call_order(model, res)

    def first(g):
        sites = [g.producers[0]] if g.kind == "heads" else g.producers
        return min(order[p] for p in sites)

    firsts = [first(g) for g in graph.groups]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
    for g in graph.groups:
        if g.kind == "channels":
            assert order[g.name] == first(g), g.name


def test_resnet50_groups_in_execution_order():
    b = built("resnet50")
    expected = ["conv1"]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            expected += [f"layer{stage}.{block}.conv1", f"layer{stage}.{block}.conv2"]
            if block == 0:
                expected.append(f"layer{stage}.0.conv3")   # the stage's residual stream
    assert [g.name for g in b.graph.groups] == expected
    sizes = {g.name: g.size for g in b.graph.groups}
    assert sizes["conv1"] == 64 and sizes["layer1.0.conv3"] == 256 and sizes["layer4.0.conv3"] == 2048
    assert sizes["layer3.5.conv2"] == 256
    stream = b.graph.groups[3]
    assert sorted(stream.producers) == sorted(["layer1.0.conv3", "layer1.0.downsample.0",
                                               "layer1.1.conv3", "layer1.2.conv3"])
    # the classifier's outputs (the classes) and the stem's input are never a group
    assert all("fc" not in g.producers for g in b.graph.groups)
    assert b.graph.layers["fc"].out_group is None and b.graph.layers["conv1"].in_group is None
    _assert_execution_order(b.model, b.graph, b.res)


def test_vit_tiny_groups_in_execution_order():
    b = built("vit_tiny")
    model, graph, res = b.model, b.graph, b.res
    assert all(not isinstance(m, nn.MultiheadAttention) for m in model.modules())
    groups = graph.groups
    assert len(groups) == 1 + 2 * 6
    assert groups[0].name == "conv_proj" and groups[0].size == 192 and groups[0].residual
    assert set(groups[0].params) == {"class_token", "encoder.pos_embedding"}
    for i in range(6):
        heads, mlp = groups[1 + 2 * i], groups[2 + 2 * i]
        layer = f"encoder.layers.encoder_layer_{i}"
        assert (heads.name, heads.kind, heads.size) == (f"{layer}.self_attention.heads", "heads", 3)
        assert (mlp.name, mlp.kind, mlp.size) == (f"{layer}.mlp.0", "channels", 768)
        assert mlp.consumers == [f"{layer}.mlp.3"]
        assert graph.layers[f"{layer}.self_attention"].head_group == heads.index
        assert graph.layers[f"{layer}.self_attention"].in_group == 0
        assert graph.layers[f"{layer}.self_attention"].out_group == 0
    _assert_execution_order(model, graph, res)


# --------------------------------------------------------------------------- 3c. rebuild + load


@pytest.mark.parametrize("name", [*MODELS, "vit_tiny"])
def test_rebuild_and_load_state_dict_is_bitwise_identical(name):
    b, e = built(name), extraction(name, 0.5)
    torch.manual_seed(123)
    fresh = convert_attention(build_backbone(name, NUM_CLASSES, b.res)).eval()
    rebuilt = rebuild(fresh, e.structure).eval()
    want = e.small.state_dict()
    got = rebuilt.state_dict()
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape for k in want)
    with torch.no_grad():
        before = rebuilt(b.x)
        reference = e.small(b.x)
    assert not torch.equal(before, reference)   # fresh weights: the load below matters
    rebuilt.load_state_dict(want, strict=True)
    with torch.no_grad():
        after = rebuilt(b.x)
    assert torch.equal(after, reference)
    # rebuilding does not touch the dense model it was given
    assert all(not isinstance(m, nn.MultiheadAttention) for m in fresh.modules())
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in b.model.parameters())


# --------------------------------------------------------------------------- 3d. round_to


@pytest.mark.parametrize("name", MODELS)
def test_round_to_8_widths_and_budget(name):
    b = built(name)
    ratio = 0.5
    scores = [torch.randn(s, generator=torch.Generator().manual_seed(7 + i))
              for i, s in enumerate(b.graph.group_sizes())]
    kept = choose_channels(scores, b.flops, ratio, round_to=8)
    widths = [len(k) for k in kept]
    sizes = b.graph.group_sizes()
    kinds = [g.kind for g in b.graph.groups]
    # channel groups are rounded; attention-head groups (12 heads in a ViT-B layer) are not, by design
    bad = [(g.name, w, s) for g, w, s in zip(b.graph.groups, widths, sizes)
           if g.kind == "channels" and not (w % 8 == 0 or w == s)]
    assert not bad, bad
    assert "channels" in kinds
    assert all(1 <= w <= s for w, s in zip(widths, sizes))
    assert any(w < s for w, s in zip(widths, sizes))
    for k, s in zip(kept, sizes):   # sorted, unique, in range
        assert torch.equal(k, torch.unique(k)) and int(k.min()) >= 0 and int(k.max()) < s
    assert b.flops.ratio(widths) <= ratio
    assert b.flops.ratio(widths) >= ratio * 0.9     # still uses most of the budget


# --------------------------------------------------------------------------- 3e. impossible budget


def test_impossible_budget_raises_budget_error():
    b = built("resnet50")
    torch.manual_seed(5)
    scores = [torch.randn(s) for s in b.graph.group_sizes()]
    with pytest.raises(BudgetError, match="min_keep"):
        choose_channels(scores, b.flops, 0.001)
    # a lower min_keep makes a smaller budget feasible than the default floor allows
    floor = [max(1, math.ceil(0.05 * s)) for s in b.graph.group_sizes()]
    floor_ratio = b.flops.ratio(floor)
    with pytest.raises(BudgetError):
        choose_channels(scores, b.flops, floor_ratio * 0.99)
    kept = choose_channels(scores, b.flops, floor_ratio * 0.99, min_keep=0.01)
    assert b.flops.ratio([len(k) for k in kept]) <= floor_ratio * 0.99


# --------------------------------------------------------------------------- 3f. JSON


@pytest.mark.parametrize("name", MODELS)
def test_structure_json_roundtrip_is_lossless(name):
    e = extraction(name, 0.3)
    loaded = json.loads(json.dumps(e.structure, allow_nan=False))
    assert loaded == e.structure
    assert [g["kept"] for g in loaded["groups"]] == [k.tolist() for k in e.kept]


@pytest.mark.parametrize("name", ["resnet50", "vit_b_16", "vit_tiny"])
def test_extract_from_json_loaded_structure(name):
    b, e = built(name), extraction(name, 0.5)
    loaded = json.loads(json.dumps(e.structure, allow_nan=False))
    again = extract(b.model, loaded).eval()
    with torch.no_grad():
        assert torch.equal(again(b.x), e.small(b.x))


def test_structure_rejects_unknown_version():
    b, e = built("resnet50"), extraction("resnet50", 0.5)
    bad = json.loads(json.dumps(e.structure))
    bad["version"] = 999
    with pytest.raises(ValueError, match="version"):
        extract(b.model, bad)


# --------------------------------------------------------------------------- 3g. attention conversion


@pytest.mark.parametrize("train", [False, True])
def test_self_attention_matches_multihead(train):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(48, 4, dropout=0.0, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.uniform_(-0.5, 0.5)
        mha.out_proj.bias.uniform_(-0.5, 0.5)
    mha.train(train)
    sa = SelfAttention.from_multihead(mha).train(train)
    assert sa.in_proj_weight is mha.in_proj_weight and sa.out_proj is mha.out_proj
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
        got, weights = sa(x, x, x, need_weights=False)
    assert weights is None
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_convert_attention_keeps_vit_function_and_state_dict():
    torch.manual_seed(4)
    model = build_backbone("vit_tiny", NUM_CLASSES, 32).eval()
    _randomise(model)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        convert_attention(model)
        got = model(x)
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) == 6
    assert list(model.state_dict()) == keys
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_round_to_never_goes_below_the_min_keep_floor():
    from pruning.extract import min_widths, round_width
    for size in (64, 256, 512, 1024, 2048, 3072):
        floor = min_widths([size], 0.05)[0]
        for width in range(0, size + 1, 7):
            w = round_width(width, size, 8, floor)
            assert floor <= w <= size and (w % 8 == 0 or w == size), (size, width, w)
    assert round_width(20, 512, 8) == 24 and round_width(28, 512, 8) == 32  # halves round up

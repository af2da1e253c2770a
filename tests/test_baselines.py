"""Weight statistics (METHODS.md 2.2) and the structured baselines l1 / random / uniform (METHODS.md 4)."""
from __future__ import annotations

import math

import pytest
import torch

from pruning.baselines import (BASELINES, l1_importance, select_baseline, select_l1, select_random,
                               select_uniform)
from pruning.extract import BudgetError, min_widths
from pruning.flops_model import FlopsModel
from pruning.graph import ChannelGroup, PruneGraph, build_graph
from pruning.stats import group_statistics
from trainer.models import build_backbone

RES = 32
MIN_KEEP = 0.05


def _setup(name: str, seed: int):
    torch.manual_seed(seed)
    model = build_backbone(name, 10, RES)
    graph = build_graph(model, RES)
    # Norm weights start at 1; make them distinct (and partly negative) so |gamma| is a real check.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 4 - 2)
    model.eval()
    return model, graph, FlopsModel(model, graph, RES), group_statistics(model, graph)


@pytest.fixture(scope="module")
def resnet18():
    return _setup("resnet18", 0)


@pytest.fixture(scope="module")
def vit():
    return _setup("vit_tiny", 1)


def _group(graph, name):
    (g,) = [g for g in graph.groups if g.name == name]
    return g


def _expected(parts: list[torch.Tensor], gammas: list[torch.Tensor]) -> torch.Tensor:
    w = torch.cat([p.detach().float().flatten() for p in parts])
    gamma = torch.stack([x.detach().abs() for x in gammas]).mean() if gammas else torch.tensor(0.0)
    return torch.stack([w.abs().sum(), w.norm(), w.mean(), w.std(correction=0), gamma])


def _widths(kept):
    return [len(k) for k in kept]


def _check_kept(kept, sizes):
    assert len(kept) == len(sizes)
    for k, c in zip(kept, sizes):
        assert k.dtype == torch.long
        assert len(k) >= 1 and k.min() >= 0 and k.max() < c
        assert torch.equal(k, torch.sort(torch.unique(k)).values)  # sorted, no duplicates


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("fixture", ["resnet18", "vit"])
def test_stats_shapes_and_types(fixture, request):
    model, graph, _, stats = request.getfixturevalue(fixture)
    assert len(stats) == len(graph.groups)
    for s, g in zip(stats, graph.groups):
        assert s.shape == (g.size, 5)
        assert s.dtype == torch.float32 and s.device.type == "cpu" and not s.requires_grad
        assert torch.isfinite(s).all()
        assert (s[:, [0, 1, 3, 4]] >= 0).all()
        # L2 <= L1 for every channel; the two differ (many weights per channel)
        assert (s[:, 1] <= s[:, 0] + 1e-4).all() and (s[:, 1] < s[:, 0]).any()


def test_stats_plain_conv_channel(resnet18):
    model, graph, _, stats = resnet18
    g = _group(graph, "layer2.0.conv1")
    assert g.producers == ["layer2.0.conv1"] and not g.residual
    c = 37
    conv, bn = model.layer2[0].conv1, model.layer2[0].bn1
    expected = _expected([conv.weight[c]], [bn.weight[c]])
    torch.testing.assert_close(stats[g.index][c], expected, rtol=1e-5, atol=1e-6)
    # gamma column is |bn.weight| for the whole group
    torch.testing.assert_close(stats[g.index][:, 4], bn.weight.detach().abs())
    assert (bn.weight < 0).any()  # so the abs is exercised


def test_stats_residual_group_resnet50():
    torch.manual_seed(2)
    model = build_backbone("resnet50", 10, RES)
    graph = build_graph(model, RES)
    g = _group(graph, "layer1.0.conv3")
    convs = ["layer1.0.downsample.0", "layer1.0.conv3", "layer1.1.conv3", "layer1.2.conv3"]
    norms = ["layer1.0.downsample.1", "layer1.0.bn3", "layer1.1.bn3", "layer1.2.bn3"]
    assert sorted(g.producers) == sorted(convs) and sorted(g.norms) == sorted(norms)
    with torch.no_grad():
        for n in norms:
            model.get_submodule(n).weight.uniform_(-2, 2)
    (stats,) = group_statistics(model, PruneGraph(groups=[g]))  # this group only: keeps the test fast
    assert stats.shape == (256, 5)
    for c in (0, 201):
        expected = _expected([model.get_submodule(n).weight[c] for n in convs],
                             [model.get_submodule(n).weight[c] for n in norms])
        torch.testing.assert_close(stats[c], expected, rtol=1e-5, atol=1e-6)
    # one producer alone would give other numbers
    alone = _expected([model.get_submodule(convs[1]).weight[0]], [])
    assert not torch.allclose(stats[0, :4], alone[:4])


def test_stats_vit_head_group(vit):
    model, graph, _, stats = vit
    attn = model.encoder.layers[2].self_attention
    g = _group(graph, "encoder.layers.encoder_layer_2.self_attention.heads")
    assert g.kind == "heads" and g.size == attn.num_heads == 3
    H, d = attn.num_heads, attn.head_dim
    w = attn.in_proj_weight
    for h in range(H):
        rows = [w[s * H * d + h * d: s * H * d + (h + 1) * d] for s in range(3)]   # q, k, v of head h
        torch.testing.assert_close(stats[g.index][h], _expected(rows, []), rtol=1e-5, atol=1e-6)
    # not the contiguous block of 3*d rows (which would mix heads)
    wrong = _expected([w[1 * 3 * d: 2 * 3 * d]], [])
    assert not torch.allclose(stats[g.index][1], wrong)


def test_stats_vit_mlp_and_embedding_groups(vit):
    model, graph, _, stats = vit
    layer = model.encoder.layers[0]
    g = _group(graph, "encoder.layers.encoder_layer_0.mlp.0")
    fc = layer.mlp[0]
    assert g.norms == []
    with torch.no_grad():
        fc.bias.fill_(5.0)  # biases are not part of the statistics
    fresh = group_statistics(model, PruneGraph(groups=[g]))[0]
    torch.testing.assert_close(fresh[100], _expected([fc.weight[100]], []), rtol=1e-5, atol=1e-6)
    assert (stats[g.index][:, 4] == 0).all()
    # the embedding group: conv_proj, every out_proj and every mlp.3; gamma over all its LayerNorms
    e = graph.groups[0]
    assert e.residual and "conv_proj" in e.producers and len(e.norms) == 13
    c = 11
    parts = [model.get_submodule(p).weight[c] for p in e.producers]
    gammas = [model.get_submodule(n).weight[c] for n in e.norms]
    torch.testing.assert_close(stats[0][c], _expected(parts, gammas), rtol=1e-5, atol=1e-6)


def test_stats_norm_without_affine_weight_gives_zero():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8, affine=False),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    g = ChannelGroup(  # a hand-built group is enough here
        index=0, name="0", size=8, kind="channels", producers=["0"], consumers=["3"], norms=["1"],
                     params=[], mask_sites=["1"], residual=False)
    (s,) = group_statistics(model, PruneGraph(groups=[g]))
    assert (s[:, 4] == 0).all()
    torch.testing.assert_close(s[2], _expected([model[0].weight[2]], []))


# --------------------------------------------------------------------------- importances


def test_l1_importance_normalised_per_group():
    stats = [torch.rand(6, 5) * 10, torch.zeros(4, 5), torch.tensor([[3.0, 0, 0, 0, 0], [1.5, 0, 0, 0, 0]])]
    imp = l1_importance(stats)
    assert imp[0].max() == 1 and (imp[0] > 0).all() and (imp[0] <= 1).all()
    torch.testing.assert_close(imp[0], stats[0][:, 0] / stats[0][:, 0].max())
    assert torch.equal(imp[1], torch.zeros(4))  # all-zero group: no NaN
    torch.testing.assert_close(imp[2], torch.tensor([1.0, 0.5]))


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize("fixture", ["resnet18", "vit"])
@pytest.mark.parametrize("method", ["l1", "random", "uniform"])
def test_baselines_meet_budget(fixture, method, request):
    _, graph, flops, stats = request.getfixturevalue(fixture)
    sizes = graph.group_sizes()
    for ratio in (0.5, 0.3):
        kept = select_baseline(method, stats, flops, ratio, min_keep=MIN_KEEP, round_to=1, seed=0)
        _check_kept(kept, sizes)
        widths = _widths(kept)
        assert all(w >= f for w, f in zip(widths, min_widths(sizes, MIN_KEEP)))
        got = flops.ratio(widths)
        assert got <= ratio + 1e-9
        if method == "uniform" and fixture == "vit":
            continue  # 3 heads per layer: the uniform fraction moves in coarse steps (checked below)
        assert got >= 0.98 * ratio, (method, ratio, got)


def test_baselines_meet_budget_rounded(resnet18):
    _, graph, flops, stats = resnet18
    for method in BASELINES:
        kept = select_baseline(method, stats, flops, 0.5, min_keep=MIN_KEEP, round_to=8, seed=0)
        widths = _widths(kept)
        assert flops.ratio(widths) <= 0.5
        assert all(w % 8 == 0 or w == c for w, c in zip(widths, graph.group_sizes()))


def test_budget_below_floor_raises(resnet18):
    _, _, flops, stats = resnet18
    for method in BASELINES:
        with pytest.raises(BudgetError):
            select_baseline(method, stats, flops, 0.001, min_keep=MIN_KEEP, round_to=1, seed=0)


# --------------------------------------------------------------------------- l1


def test_l1_keeps_top_channels_in_every_group(vit):
    _, _, flops, stats = vit
    kept = select_l1(stats, flops, 0.5, MIN_KEEP, 1)
    imp = l1_importance(stats)
    pruned_some = False
    for k, s in zip(kept, imp):
        dropped = torch.ones(len(s), dtype=torch.bool)
        dropped[k] = False
        if dropped.any():
            pruned_some = True
            assert s[k].min() >= s[dropped].max()
    assert pruned_some


def test_l1_keeps_scaled_up_filters(resnet18):
    model, graph, flops, stats = resnet18
    g = _group(graph, "layer3.0.conv1")  # 256 channels, a plain conv
    big = torch.tensor([3, 50, 51, 120, 200, 255])
    weight = model.layer3[0].conv1.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[big] *= 100.0
        stats = list(stats)
        stats[g.index] = group_statistics(model, PruneGraph(groups=[g]))[0]  # the only group that changed
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    kept = select_l1(stats, flops, 0.5, MIN_KEEP, 1)[g.index]
    assert set(big.tolist()) <= set(kept.tolist())
    # every other channel of that layer now looks ~100x less important: the layer is cut to the floor
    assert len(kept) == max(len(big), math.ceil(MIN_KEEP * g.size))


# --------------------------------------------------------------------------- random


def test_random_same_widths_as_l1_different_channels(resnet18, vit):
    for _, graph, flops, stats in (resnet18, vit):
        l1 = select_l1(stats, flops, 0.5, MIN_KEEP, 1)
        rnd = select_random(stats, flops, 0.5, MIN_KEEP, 1, seed=3)
        _check_kept(rnd, graph.group_sizes())
        assert _widths(rnd) == _widths(l1)
        pruned = [g for g, (k, c) in enumerate(zip(l1, graph.group_sizes())) if len(k) < c]
        differs = [g for g in pruned if not torch.equal(rnd[g], l1[g])]
        assert pruned and len(differs) == len(pruned)


def test_random_seeds(resnet18):
    _, _, flops, stats = resnet18
    a = select_baseline("random", stats, flops, 0.5, min_keep=MIN_KEEP, round_to=1, seed=7)
    b = select_baseline("random", stats, flops, 0.5, min_keep=MIN_KEEP, round_to=1, seed=7)
    c = select_baseline("random", stats, flops, 0.5, min_keep=MIN_KEEP, round_to=1, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert _widths(a) == _widths(c)


# --------------------------------------------------------------------------- uniform


def _uniform_interval(widths, sizes, floors):
    """The keep fractions rho for which max(ceil(rho * C_g), floor_g) == width_g in every group."""
    lo, hi = 0.0, 1.0
    for w, c, f in zip(widths, sizes, floors):
        if w > f:
            lo, hi = max(lo, (w - 1) / c), min(hi, w / c)
        else:
            assert w == f
            hi = min(hi, f / c)
    return lo, hi


@pytest.mark.parametrize("fixture", ["resnet18", "vit"])
def test_uniform_same_fraction_everywhere(fixture, request):
    _, graph, flops, stats = request.getfixturevalue(fixture)
    sizes, floors = graph.group_sizes(), min_widths(graph.group_sizes(), MIN_KEEP)
    kept = select_uniform(stats, flops, 0.5, MIN_KEEP, 1)
    widths = _widths(kept)
    lo, hi = _uniform_interval(widths, sizes, floors)
    assert lo < hi, widths  # one fraction explains every group's width
    assert len(set(widths)) > 1 and min(w / c for w, c in zip(widths, sizes)) < 1
    # the largest such fraction: the next step up breaks the budget
    step = [max(math.ceil((hi + 1e-9) * c), f) for c, f in zip(sizes, floors)]
    assert flops.ratio(step) > 0.5
    # l1 at the same budget is not uniform (so this test tells them apart)
    l1 = _widths(select_l1(stats, flops, 0.5, MIN_KEEP, 1))
    lo1, hi1 = _uniform_interval(l1, sizes, floors)
    assert lo1 >= hi1
    # channels by L1 rank inside each group
    for k, s in zip(kept, l1_importance(stats)):
        dropped = torch.ones(len(s), dtype=torch.bool)
        dropped[k] = False
        if dropped.any():
            assert s[k].min() >= s[dropped].max()


# --------------------------------------------------------------------------- entry point


def test_select_baseline_dispatch_and_errors(resnet18):
    _, _, flops, stats = resnet18
    assert set(BASELINES) == {"l1", "random", "uniform"}
    l1 = select_baseline("l1", stats, flops, 0.5, min_keep=MIN_KEEP, round_to=1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(l1, select_l1(stats, flops, 0.5, MIN_KEEP, 1)))
    with pytest.raises(ValueError, match="unknown"):
        select_baseline("l2", stats, flops, 0.5, min_keep=MIN_KEEP, round_to=1, seed=0)
    with pytest.raises(ValueError):
        select_baseline("l1", stats[:-1], flops, 0.5, min_keep=MIN_KEEP, round_to=1, seed=0)

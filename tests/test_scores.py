"""Score masks for unstructured sparsity, label mapping and per-weight MACs (METHODS.md section 3)."""
from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning.label_mapping import greedy_mapping, map_classifier, prediction_counts
from pruning.scores import (SCORE_SUFFIX, FixedMasks, ScoreMasks, density_report, keep_top, magnitude_masks,
                            random_masks, scorable_weights, zero_masked)
from trainer.models import build_backbone
from trainer.models.flops import count_macs, weight_macs

pytestmark = pytest.mark.usefixtures("one_thread")

DENSITIES = [0.5, 0.1, 0.01]
# The acceptance models: (name, image size). Built one at a time (vgg16_bn alone has ~138M weights).
BIG = [("resnet50", 64), ("vgg16_bn", 32), ("vit_b_16", 32)]


def _expected_kept(n: int, density: float) -> int:
    """n - k with k = floor((1 - density) * n), written out independently of the library."""
    return n - math.floor((1.0 - density) * n)


def _tiny_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes),
    )


def _vit_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("vit_tiny", 10, 32)
    with torch.no_grad():  # torchvision zero-initialises the head: randomise it so it matters
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def _set_scores(sm: ScoreMasks, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for s, v in zip(sm.scores(), values):
            s.copy_(v)


# --------------------------------------------------------------------------- exact density on the big models


@pytest.fixture(scope="module", params=BIG, ids=[n for n, _ in BIG])
def big_model(request):
    name, res = request.param
    torch.manual_seed(0)
    model = build_backbone(name, 10, res)
    yield model
    del model
    gc.collect()


@pytest.mark.parametrize("density", DENSITIES)
def test_global_threshold_keeps_exact_count(big_model, density):
    """Global threshold: kept == ceil(d*N) == N - floor((1-d)*N); |kept - d*N| < 1 <= number of scored layers."""
    sm = ScoreMasks(big_model, density)
    try:
        masks = sm.masks()
        assert all(m.dtype == torch.bool and m.shape == w.weight.shape for m, w in zip(masks, sm.weights))
        n = sum(w.weight.numel() for w in sm.weights)
        report = density_report(sm.masks_by_key())
        kept = report["kept"]
        assert sm.total() == report["total"] == n and sm.kept() == kept
        assert kept == _expected_kept(n, density) == math.ceil(density * n)
        assert report["density"] == kept / n
        assert len(set(report["per_layer"].values())) > 1  # one global threshold, not one fraction per layer
        assert abs(kept - density * n) < 1
        assert abs(kept - density * n) <= len(sm.weights)  # the spec's bound: one weight per scored layer
    finally:
        sm.remove()


def test_layer_threshold_keeps_exact_count_per_layer(big_model):
    """threshold="layer": every layer keeps exactly n_l - floor((1-d)*n_l) of its weights."""
    density = 0.1
    sm = ScoreMasks(big_model, density, threshold="layer")
    try:
        fractional = 0
        for w, m in zip(sm.weights, sm.masks()):
            n = w.weight.numel()
            assert int(m.sum()) == _expected_kept(n, density), w.key
            fractional += (density * n) != int(density * n)
        assert fractional > 0  # some layers have a non-integer target, so rounding is exercised
    finally:
        sm.remove()


def test_state_dict_keys_with_scores_and_after_remove(big_model):
    """Attached: state dict = original keys + one `<weight key>_score` per scored weight; removed: original keys."""
    original = list(big_model.state_dict().keys())
    original_params = {k: p for k, p in big_model.named_parameters()}
    sm = ScoreMasks(big_model, 1.0)  # density 1: no threshold to compute, keeps everything
    try:
        scored = [w.key for w in sm.weights]
        assert len(scored) == len(set(scored)) > 0
        keys = list(big_model.state_dict().keys())
        assert len(keys) == len(original) + len(scored)
        assert set(keys) == set(original) | {k + SCORE_SUFFIX for k in scored}
        state = big_model.state_dict()
        for w in sm.weights:
            assert state[w.key + SCORE_SUFFIX].shape == w.weight.shape
        assert all(bool(m.all()) for m in sm.masks())
    finally:
        final = sm.remove()
    assert set(final) == set(scored)
    assert list(big_model.state_dict().keys()) == original
    # The weights are the same Parameter objects again, not shadowed by masked tensors.
    assert {k: p for k, p in big_model.named_parameters()} == original_params
    for w in sm.weights:
        assert getattr(w.module, w.param_name) is original_params[w.key]
        assert not hasattr(w.module, w.param_name + SCORE_SUFFIX)


# --------------------------------------------------------------------------- small-model behaviour


@pytest.mark.parametrize("threshold", ["global", "layer"])
@pytest.mark.parametrize("density", [0.5, 0.37, 0.1, 0.01])
def test_ties_still_give_exact_count(threshold, density):
    """All-equal |S| (mixed signs) and |S| from a 3-value set still keep exactly N - floor((1-d)*N)."""
    model = _tiny_cnn()
    sm = ScoreMasks(model, density, threshold=threshold)
    g = torch.Generator().manual_seed(1)
    shapes = [s.shape for s in sm.scores()]

    def check(expect_prefix: bool):
        masks = sm.masks()
        abs_scores = [s.detach().abs() for s in sm.scores()]
        if threshold == "global":
            n = sum(m.numel() for m in masks)
            assert sum(int(m.sum()) for m in masks) == _expected_kept(n, density)
            flat_m = torch.cat([m.flatten() for m in masks])
            flat_s = torch.cat([s.flatten() for s in abs_scores])
            groups = [(flat_m, flat_s)]
        else:
            for m in masks:
                assert int(m.sum()) == _expected_kept(m.numel(), density)
            groups = [(m.flatten(), s.flatten()) for m, s in zip(masks, abs_scores)]
        for m, s in groups:
            if m.any() and (~m).any():
                assert s[m].min() >= s[~m].max()
            if expect_prefix:  # all tied: the documented tie-break keeps the first positions
                kept = int(m.sum())
                assert bool(m[:kept].all()) and not bool(m[kept:].any())

    signs = [torch.randint(0, 2, sh, generator=g).float() * 2 - 1 for sh in shapes]
    _set_scores(sm, [0.5 * sg for sg in signs])
    check(expect_prefix=True)
    _set_scores(sm, [torch.tensor([0.1, 0.2, 0.3])[torch.randint(0, 3, sh, generator=g)] * sg
                     for sh, sg in zip(shapes, signs)])
    check(expect_prefix=False)
    sm.remove()


@pytest.mark.parametrize("threshold", ["global", "layer"])
def test_threshold_recomputed_after_each_optimizer_step(threshold):
    """Training only scores with Adam: after every step masks() == keep_top(|S|) from scratch, the forward
    uses that mask, the count stays exact, and the mask changes at some point."""
    density = 0.2
    model = _tiny_cnn(seed=2)
    plain = copy.deepcopy(model)
    sm = ScoreMasks(model, density, threshold=threshold)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(SCORE_SUFFIX))
    weights_before = {w.key: w.weight.detach().clone() for w in sm.weights}
    opt = torch.optim.Adam(sm.scores(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
    previous = [m.clone() for m in sm.masks()]
    assert sm.masks() is sm.masks()  # cached while the scores are unchanged
    changed_steps = 0
    for _ in range(6):
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sm.scores())
        opt.step()
        masks = sm.masks()
        reference = keep_top([s.detach().abs() for s in sm.scores()], density, threshold)
        assert all(torch.equal(m, r) for m, r in zip(masks, reference))
        n = sum(m.numel() for m in masks)
        if threshold == "global":
            assert sum(int(m.sum()) for m in masks) == _expected_kept(n, density)
        else:
            assert all(int(m.sum()) == _expected_kept(m.numel(), density) for m in masks)
        changed_steps += any(not torch.equal(m, p) for m, p in zip(masks, previous))
        previous = [m.clone() for m in masks]
        # The next forward uses the new mask: compare with a plain copy holding W * M (and the same BN stats).
        state = {k: v for k, v in model.state_dict().items() if not k.endswith(SCORE_SUFFIX)}
        for key, r in zip([w.key for w in sm.weights], reference):
            state[key] = state[key] * r
        plain.load_state_dict(state)
        model.eval(), plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    assert changed_steps > 0
    assert all(torch.equal(w.weight, weights_before[w.key]) for w in sm.weights)  # weights frozen


def test_straight_through_gradient_single_linear():
    """d loss/dS == (d loss/d(W*M)) * W * sign(S); d loss/dW == (d loss/d(W*M)) * M."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    sm = ScoreMasks(lin, 0.5)
    assert [w.key for w in sm.weights] == ["weight"]
    (score,) = sm.scores()
    _set_scores(sm, [torch.randn(4, 6)])  # signs independent of W's, so sign(S) matters
    mask = sm.masks()[0]
    assert int(mask.sum()) == 12
    x, g = torch.randn(5, 6), torch.randn(5, 4)
    (lin(x) * g).sum().backward()

    w = lin.weight.detach()
    effective = (w * mask.float()).requires_grad_()
    (F.linear(x, effective, lin.bias.detach()) * g).sum().backward()
    expected = effective.grad * w * score.detach().sign()
    torch.testing.assert_close(score.grad, expected)
    torch.testing.assert_close(lin.weight.grad, effective.grad * mask.float())
    assert (score.grad[~mask] != 0).any()  # masked weights' scores still get a gradient
    sm.remove()


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_masked_forward_equals_zeroed_weights(name):
    """Eval forward with ScoreMasks == forward of a copy with zero_masked weights; remove() restores dense."""
    if name == "vit_tiny":
        model = _vit_tiny(seed=3)
    else:
        torch.manual_seed(3)
        model = build_backbone(name, 10, 32)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        dense = model(x)
    sm = ScoreMasks(model, 0.1)
    keys = [w.key for w in sm.weights]
    if name == "vit_tiny":
        attention = "encoder.layers.encoder_layer_0.self_attention"
        assert f"{attention}.in_proj_weight" in keys and f"{attention}.out_proj.weight" in keys
    masked_grad = model(x)  # with grad: the plain MultiheadAttention path
    with torch.no_grad():
        masked_nograd = model(x)  # without grad: MultiheadAttention may take its fused fast path
    masks = sm.masks_by_key()
    assert set(masks) == set(keys)
    zero_masked(reference, masks)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(masked_grad.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masked_nograd, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dense, expected, rtol=1e-3, atol=1e-4)  # the mask matters
    sm.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense)


@pytest.mark.parametrize("name, stem, head", [("resnet18", "conv1.weight", "fc.weight"),
                                              ("vit_tiny", "conv_proj.weight", "heads.head.weight")])
def test_exclude_first_and_classifier(name, stem, head):
    """exclude_first drops exactly the stem/patch embedding, exclude_classifier exactly the head."""
    torch.manual_seed(0)
    model = build_backbone(name, 10, 32)
    every = [w.key for w in scorable_weights(model)]
    assert every[0] == stem and every[-1] == head
    assert [w.key for w in scorable_weights(model, exclude_first=True)] == every[1:]
    assert [w.key for w in scorable_weights(model, exclude_classifier=True)] == every[:-1]
    assert [w.key for w in scorable_weights(model, exclude_first=True, exclude_classifier=True)] == every[1:-1]
    sm = ScoreMasks(model, 1.0, exclude_first=True, exclude_classifier=True)
    scored = {k[:-len(SCORE_SUFFIX)] for k in model.state_dict() if k.endswith(SCORE_SUFFIX)}
    assert scored == set(every[1:-1])
    sm.remove()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fixed_masks_keep_pruned_weights_zero(optimizer):
    """FixedMasks: masked weights stay exactly 0 through 5 steps (SGD momentum+wd / AdamW); kept ones move."""
    model = _tiny_cnn(seed=4)
    weights = scorable_weights(model)
    masks = random_masks(weights, 0.3, seed=0)
    before = {w.key: w.weight.detach().clone() for w in weights}
    fixed = FixedMasks(model, masks)
    for w in weights:
        assert (w.weight[~masks[w.key]] == 0).all()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(5):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for w in weights:
            assert (w.weight[~masks[w.key]] == 0).all(), w.key
    for w in weights:
        m = masks[w.key]
        assert (w.weight[m] != before[w.key][m]).all(), w.key
    # Without the gradient hooks the pruned weights would move: the hooks are what holds them at zero.
    fixed.remove()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert any((w.weight[~masks[w.key]] != 0).any() for w in weights)


@pytest.mark.parametrize("threshold", ["global", "layer"])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.03])
def test_magnitude_masks_keep_largest_weights(density, threshold):
    """magnitude_masks keeps exactly the largest |W| (sorted reference), with the exact count."""
    model = _tiny_cnn(seed=5)
    weights = scorable_weights(model)
    masks = magnitude_masks(weights, density, threshold)
    assert list(masks) == [w.key for w in weights]
    groups = [weights] if threshold == "global" else [[w] for w in weights]
    for group in groups:
        values = torch.cat([w.weight.detach().abs().flatten() for w in group])
        got = torch.cat([masks[w.key].flatten() for w in group])
        keep = _expected_kept(values.numel(), density)
        reference = torch.zeros_like(got)
        reference[torch.argsort(values, descending=True)[:keep]] = True
        assert int(got.sum()) == keep
        assert torch.equal(got, reference)


def test_random_masks_exact_count_and_seeded():
    """random_masks keeps exactly N - floor((1-d)*N), is reproducible per seed and differs across seeds."""
    model = _tiny_cnn(seed=6)
    weights = scorable_weights(model)
    n = sum(w.weight.numel() for w in weights)
    for density in (0.5, 0.1, 0.01):
        masks = random_masks(weights, density, seed=0)
        assert list(masks) == [w.key for w in weights]
        assert all(masks[w.key].shape == w.weight.shape and masks[w.key].dtype == torch.bool for w in weights)
        assert sum(int(m.sum()) for m in masks.values()) == _expected_kept(n, density)
        again = random_masks(weights, density, seed=0)
        assert all(torch.equal(masks[k], again[k]) for k in masks)
        other = random_masks(weights, density, seed=1)
        assert any(not torch.equal(masks[k], other[k]) for k in masks)
        report = density_report(masks)
        assert report["total"] == n and report["kept"] == _expected_kept(n, density)
        assert report["per_layer"] == {w.key: int(masks[w.key].sum()) / w.weight.numel() for w in weights}


def test_score_masks_rejects_bad_arguments():
    """Density outside (0, 1] and unknown thresholds raise ValueError."""
    model = _tiny_cnn()
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            ScoreMasks(model, density)
    with pytest.raises(ValueError):
        ScoreMasks(model, 0.5, threshold="per-tensor")
    with pytest.raises(ValueError):
        keep_top([torch.rand(4)], 0.5, threshold="per-tensor")
    assert not any(k.endswith(SCORE_SUFFIX) for k in model.state_dict())


# --------------------------------------------------------------------------- label mapping


class _PermutedClassifier(nn.Module):
    """Reads the class encoded (one-hot, noisy) in its input and puts the largest logit at output perm[class]."""

    def __init__(self, perm: list[int], num_outputs: int, as_tuple: bool):
        super().__init__()
        self.linear = nn.Linear(len(perm), num_outputs, bias=False)
        self.as_tuple = as_tuple
        with torch.no_grad():
            self.linear.weight.normal_(0, 0.1)
            for c, o in enumerate(perm):
                self.linear.weight[o, c] += 5.0

    def forward(self, x):
        logits = self.linear(x)
        return (logits, x.sum()) if self.as_tuple else logits


@pytest.mark.parametrize("as_tuple", [False, True])
def test_label_mapping_recovers_known_permutation(as_tuple):
    """prediction_counts tallies (class, output) exactly; greedy_mapping recovers perm despite 10% noise."""
    perm = [13, 2, 19, 7, 0]
    classes, outputs = len(perm), 20
    torch.manual_seed(0)
    model = _PermutedClassifier(perm, outputs, as_tuple).train()
    g = torch.Generator().manual_seed(0)
    batches, expected = [], torch.zeros(classes, outputs, dtype=torch.int64)
    for _ in range(8):
        labels = torch.randint(0, classes, (25,), generator=g)
        seen = labels.clone()
        wrong = torch.rand(25, generator=g) < 0.1  # these inputs show another class
        seen[wrong] = (labels[wrong] + torch.randint(1, classes, (int(wrong.sum()),), generator=g)) % classes
        images = F.one_hot(seen, classes).float() + 0.05 * torch.randn(25, classes, generator=g)
        batches.append((images, labels))
        for c, s in zip(labels.tolist(), seen.tolist()):
            expected[c, perm[s]] += 1
    counts = prediction_counts(model, batches, classes, outputs)
    assert counts.shape == (classes, outputs) and counts.dtype == torch.int64
    assert torch.equal(counts, expected)
    assert int(counts.sum()) == 200
    assert model.training  # mode restored
    assert greedy_mapping(counts) == perm


def test_greedy_mapping_order_differs_from_argmax():
    """Greedy takes the largest count first, then the largest among free rows/columns (not per-row argmax)."""
    counts = torch.tensor([[5, 4, 0, 0],
                           [6, 0, 1, 0],
                           [0, 3, 2, 1]])
    # Per-row argmax would be [0, 0, 1]; class order would give [0, 2, 1].
    # Greedy: 6 -> class 1 to output 0; then 4 -> class 0 to output 1; then class 2: max over {2, 3} -> 2.
    assert counts.argmax(dim=1).tolist() == [0, 0, 1]
    assert greedy_mapping(counts) == [1, 0, 2]
    # An assigned class leaves the table: its second-best count (8) must not claim another output.
    assert greedy_mapping(torch.tensor([[9, 8, 0], [0, 0, 1]])) == [0, 2]
    with pytest.raises(ValueError):
        greedy_mapping(torch.zeros(5, 3, dtype=torch.int64))


def test_map_classifier_selects_rows():
    """map_classifier: new output c == old output mapping[c]; invalid mappings raise ValueError."""
    torch.manual_seed(0)
    old = nn.Linear(8, 20)
    perm = [13, 2, 19, 7, 0]
    new = map_classifier(old, perm)
    assert isinstance(new, nn.Linear) and (new.in_features, new.out_features) == (8, 5)
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x)[:, perm])
    no_bias = map_classifier(nn.Linear(8, 20, bias=False), perm)
    assert no_bias.bias is None
    for bad in ([1, 1, 2, 3, 4], [13, 2, 20, 7, 0], [-1, 2, 19, 7, 0]):
        with pytest.raises(ValueError):
            map_classifier(old, bad)


# --------------------------------------------------------------------------- per-weight MACs


def test_weight_macs_cnn_equals_count_macs():
    """resnet18: every MAC is in a Conv2d/Linear weight, so the per-weight MACs sum to count_macs."""
    torch.manual_seed(0)
    model = build_backbone("resnet18", 10, 32)
    keys = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    macs = weight_macs(model, 32, keys)
    assert set(macs) == set(keys)
    assert sum(macs.values()) == count_macs(model, 32)
    assert macs["conv1.weight"] == 16 * 16 * model.conv1.weight.numel()  # stride 2: 16x16 output positions
    assert macs["layer4.0.conv1.weight"] == 1 * model.layer4[0].conv1.weight.numel()  # 1x1 output at 32 px
    assert macs["fc.weight"] == model.fc.weight.numel()


def test_weight_macs_vit_counts_attention_weights_per_token():
    """vit_tiny: in_proj/out_proj/MLP weights cost 65 tokens x numel; the total lacks only the attention matmuls."""
    model = _vit_tiny()
    keys = [w.key for w in scorable_weights(model)]
    macs = weight_macs(model, 32, keys)
    assert set(macs) == set(keys)
    params = dict(model.named_parameters())
    tokens, layers, dim = 8 * 8 + 1, 6, 192
    for i in range(layers):
        prefix = f"encoder.layers.encoder_layer_{i}"
        for key in (f"{prefix}.self_attention.in_proj_weight", f"{prefix}.self_attention.out_proj.weight",
                    f"{prefix}.mlp.0.weight", f"{prefix}.mlp.3.weight"):
            assert macs[key] == tokens * params[key].numel(), key
    assert macs["conv_proj.weight"] == 8 * 8 * params["conv_proj.weight"].numel()
    assert macs["heads.head.weight"] == params["heads.head.weight"].numel()
    total = count_macs(model, 32)
    assert sum(macs.values()) < total
    # What is left is Q K^T and attention x V: 2 * tokens^2 * dim per layer.
    assert total - sum(macs.values()) == layers * 2 * tokens * tokens * dim

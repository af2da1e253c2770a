"""PASS hypernetwork (pruning/hypernet.py): shapes, straight-through masks, state, prompt, budget losses."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from pruning.hypernet import (BUDGET_LOSSES, PassHypernetwork, PromptEncoder, budget_loss, standardize,
                              straight_through_mask)

SIZES = [4, 6, 3]
IMAGE = 16


def raw_stats(seed: int = 0, sizes: list[int] = SIZES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(c, 5, generator=gen) * 3 + 1 for c in sizes]


def prompt_image(seed: int = 0, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(program, program * frame_mask) for a 16px pad prompt of width 2."""
    gen = torch.Generator().manual_seed(seed)
    program = torch.randn(3, IMAGE, IMAGE, generator=gen).requires_grad_(requires_grad)
    mask = torch.ones(1, IMAGE, IMAGE)
    mask[:, 2:-2, 2:-2] = 0
    return program, program * mask


def make(seed: int = 0, stats=None, **kwargs) -> PassHypernetwork:
    torch.manual_seed(seed)
    return PassHypernetwork(SIZES, raw_stats() if stats is None else stats, embed_dim=8, hidden=16, **kwargs)


@pytest.mark.parametrize("recurrent,use_stats,use_prompt", list(itertools.product([True, False], repeat=3)))
def test_shapes_and_full_network_at_start(recurrent, use_stats, use_prompt):
    net = make(recurrent=recurrent, use_stats=use_stats, use_prompt=use_prompt)
    logits = net(prompt_image()[1])
    assert [tuple(x.shape) for x in logits] == [(c,) for c in SIZES]
    assert all(x.dtype == torch.float32 for x in logits)
    for x in logits:
        assert (x > 0).all()
        assert torch.equal(straight_through_mask(x), torch.ones_like(x))
    assert hasattr(net, "phi") == use_stats and hasattr(net, "u") == use_stats and hasattr(net, "beta") == use_stats
    assert (net.encoder is not None) == use_prompt


def test_prompt_required_when_conditioned():
    with pytest.raises(ValueError, match="prompt"):
        make()(None)
    make(use_prompt=False)(None)


def test_straight_through_values_and_gradient():
    logits = torch.tensor([-3.0, -0.2, 0.0, 1e-4, 0.3, 2.5, 10.0, -10.0, 0.7]).requires_grad_()
    w = torch.linspace(-1, 2, logits.numel())
    mask = straight_through_mask(logits)
    assert torch.equal(mask, (logits > 0).float())  # exactly 0/1, not merely close
    (mask * w).sum().backward()
    q = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, w * q * (1 - q))


def test_straight_through_exact_on_many_values():
    logits = torch.randn(10000) * 5
    mask = straight_through_mask(logits)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("recurrent", [True, False])
def test_recurrence_carries_state(recurrent):
    stats = raw_stats()
    net = make(stats=stats, recurrent=recurrent, use_prompt=False)
    before = [x.detach().clone() for x in net(None)]
    changed = [s.clone() for s in stats]
    changed[0] = torch.rand(SIZES[0], 5, generator=torch.Generator().manual_seed(7)) * 10
    net.set_stats(changed)
    after = net(None)
    assert not torch.allclose(after[0], before[0])
    if recurrent:
        assert not torch.allclose(after[2], before[2], rtol=0, atol=1e-7)
    else:
        assert torch.equal(after[2], before[2])
        assert torch.equal(after[1], before[1])


@pytest.mark.parametrize("recurrent", [True, False])
def test_prompt_conditions_output_and_gets_gradient(recurrent):
    net = make(recurrent=recurrent)
    a = net(prompt_image(0)[1])
    b = net(prompt_image(1)[1])
    for x, y in zip(a, b):
        assert not torch.allclose(x, y, rtol=0, atol=1e-7)
    program, image = prompt_image(0, requires_grad=True)
    sum(x.sum() for x in net(image)).backward()
    assert program.grad is not None and program.grad[:, :2].abs().sum() > 0
    assert torch.equal(program.grad[:, 2:-2, 2:-2], torch.zeros(3, IMAGE - 4, IMAGE - 4))  # masked out


def test_prompt_encoder_any_size():
    enc = PromptEncoder(hidden=5)
    for size in (8, 13, 32):
        h0, c0 = enc(torch.randn(3, size, size))
        assert h0.shape == c0.shape == (1, 5)
        assert h0.abs().max() < 1
    with pytest.raises(ValueError):
        enc(torch.randn(1, 3, 16, 16))


def test_stats_buffers_not_in_state_dict_and_round_trip():
    net = make(seed=0)
    state = net.state_dict()
    assert not any("stats" in key for key in state)
    assert {f"stats_{g}" for g in range(len(SIZES))} <= {name for name, _ in net.named_buffers()}
    fresh = make(seed=1)
    image = prompt_image()[1]
    assert not torch.equal(fresh(image)[0], net(image)[0])
    fresh.load_state_dict(state)
    for x, y in zip(fresh(image), net(image)):
        assert torch.equal(x, y)


def test_set_stats_restandardizes_and_checks_shapes():
    net = make()
    new = raw_stats(seed=3)
    net.set_stats(new)
    for g, s in enumerate(new):
        torch.testing.assert_close(net.group_stats(g), standardize(s))
    with pytest.raises(ValueError):
        net.set_stats(new[:2])
    with pytest.raises(ValueError):
        net.set_stats([torch.rand(c + 1, 5) for c in SIZES])


def test_forward_is_float32_under_autocast():
    net = make()
    image = prompt_image()[1]
    plain = net(image)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = net(image)
    for x, y in zip(plain, auto):
        assert y.dtype == torch.float32
        assert torch.equal(x, y)


def test_budget_loss_values():
    r = torch.tensor(0.8)
    assert budget_loss(r, 0.5).item() == pytest.approx(2.0 * 0.3 ** 2)
    assert budget_loss(r, 0.5, "abs").item() == pytest.approx(0.6)
    assert budget_loss(r, 0.5, "log", weight=1.0).item() == pytest.approx(math.log(1.6))
    assert budget_loss(torch.tensor(0.3), 0.5, "square").item() == pytest.approx(2.0 * 0.04)
    assert budget_loss(torch.tensor(0.3), 0.5, "abs", weight=3.0).item() == pytest.approx(0.6)
    for kind in BUDGET_LOSSES:
        assert budget_loss(torch.tensor(0.5), 0.5, kind).item() == 0.0
    below = torch.tensor(0.3, requires_grad=True)
    loss = budget_loss(below, 0.5, "log")
    loss.backward()
    assert loss.item() == 0.0 and below.grad.item() == 0.0
    with pytest.raises(ValueError, match="square, abs, log"):
        budget_loss(r, 0.5, "cubic")


def test_standardize():
    gen = torch.Generator().manual_seed(0)
    stats = torch.rand(50, 5, generator=gen) * 10 + 3
    stats[:, 4] = 123.456  # constant column: float rounding must not turn into noise / 1e-6
    out = standardize(stats)
    torch.testing.assert_close(out[:, :4].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :4].std(0, correction=0), torch.ones(4), atol=1e-4, rtol=0)
    assert torch.equal(out[:, 4], torch.zeros(50))
    one = standardize(torch.rand(1, 5))
    assert torch.equal(one, torch.zeros(1, 5))
    assert torch.isfinite(out).all() and torch.isfinite(one).all()
    with pytest.raises(ValueError):
        standardize(torch.rand(4, 3))


@pytest.mark.parametrize("recurrent", [True, False])
def test_budget_gradient_prunes(recurrent):
    net = make(recurrent=recurrent)
    image = prompt_image()[1]
    costs = [torch.rand(c, generator=torch.Generator().manual_seed(g)) + 0.5 for g, c in enumerate(SIZES)]
    total = sum(c.sum() for c in costs)

    def ratio() -> torch.Tensor:
        return sum((straight_through_mask(x) * c).sum() for x, c in zip(net(image), costs)) / total

    assert ratio().item() == 1.0
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        budget_loss(ratio(), 0.5).backward()
        opt.step()
    assert ratio().item() < 1.0

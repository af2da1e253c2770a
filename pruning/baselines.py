"""Structured pruning baselines at a matched FLOPs budget (METHODS.md section 4).

Each baseline returns, like PASS's extraction (`extract.choose_channels`),
the sorted kept channel indices of every group, for a network costing at most
`ratio * F_dense` (and as close to it as the method's one global knob allows,
found by bisection with `extract.fit_budget`):

* `l1`: importance of channel c of group g = L1 norm of its producer filters
  (statistics column 0, `pruning.stats`), divided by the group's largest, then
  one global threshold over all groups (bisection on the threshold).
* `random`: exactly the per-group widths `l1` gives, channels drawn uniformly
  at random (a seeded `torch.Generator`): it isolates "which channels" from
  "how many per layer".
* `uniform`: the same keep fraction rho in every group, width
  `ceil(rho * C_g)` (bisection on rho in [0, 1]), channels by L1 rank inside
  the group: it isolates "how many per layer" from "which channels".

All three respect the same per-group floor (`max(1, ceil(min_keep * C_g))`)
and width rounding (`round_to`) as PASS, so the comparison is at equal
constraints. The result feeds `extract.make_structure`/`extract.extract`
like PASS's choice.

Choices the specification leaves open:

* Normalising by the group's maximum puts every group's best channel at 1;
  the global threshold then compares channels relative to their own layer
  (raw L1 norms scale with fan-in and would favour wide layers).
* A group whose producers are all zero gets importance 0 for every channel
  (no division by zero): it is cut to its floor first.
* `random` draws its channels group after group from one generator seeded
  with `seed`, so one seed gives one fixed decision.
* `uniform` counts heads like channels (a 3-head group keeps ceil(3 rho)
  heads); the rounding (`round_to`) applies after the floor, as in
  `choose_channels`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .extract import choose_channels, fit_budget, group_rounding, min_widths, round_width, top_k
from .flops_model import FlopsModel


def l1_importance(stats: list[Tensor]) -> list[Tensor]:
    """Per group: the channels' L1 norms (stats column 0) divided by the group's largest (values in [0, 1])."""
    out = []
    for s in stats:
        l1 = s[:, 0].detach().float().cpu()
        top = l1.max()
        out.append(l1 / top if top > 0 else torch.zeros_like(l1))
    return out


def select_l1(stats: list[Tensor], flops: FlopsModel, ratio: float, min_keep: float = 0.05,
              round_to: int = 1) -> list[Tensor]:
    """Kept channels per group: one global threshold on the per-group-normalised L1 importances."""
    _check(stats, flops)
    return choose_channels(l1_importance(stats), flops, ratio, min_keep=min_keep, round_to=round_to)


def select_random(stats: list[Tensor], flops: FlopsModel, ratio: float, min_keep: float = 0.05,
                  round_to: int = 1, seed: int = 0) -> list[Tensor]:
    """The per-group widths of `select_l1`, with channels drawn at random (sorted indices)."""
    widths = [len(k) for k in select_l1(stats, flops, ratio, min_keep, round_to)]
    generator = torch.Generator().manual_seed(int(seed))
    return [torch.sort(torch.randperm(len(s), generator=generator)[:w]).values for s, w in zip(stats, widths)]


def select_uniform(stats: list[Tensor], flops: FlopsModel, ratio: float, min_keep: float = 0.05,
                   round_to: int = 1) -> list[Tensor]:
    """The same keep fraction in every group (the largest meeting the budget), channels by L1 rank."""
    _check(stats, flops)
    sizes = [len(s) for s in stats]
    floor = min_widths(sizes, min_keep)
    rounding = group_rounding(flops, round_to)

    def widths_at(rho: float) -> list[int]:
        return [round_width(math.ceil(rho * c), c, r, f) for c, f, r in zip(sizes, floor, rounding)]

    widths = fit_budget(widths_at, flops, ratio, 0.0, 1.0)
    return top_k(l1_importance(stats), widths)


BASELINES: dict[str, Callable[..., list[Tensor]]] = {
    "l1": select_l1,
    "random": select_random,
    "uniform": select_uniform,
}


def select_baseline(method: str, stats: list[Tensor], flops: FlopsModel, ratio: float, *,
                    min_keep: float = 0.05, round_to: int = 1, seed: int = 0) -> list[Tensor]:
    """Kept channel indices per group for the structured baseline `method` ("l1", "random", "uniform")."""
    if method not in BASELINES:
        raise ValueError(f"unknown structured baseline {method!r}; choose one of: {', '.join(BASELINES)}")
    extra = {"seed": seed} if method == "random" else {}
    return BASELINES[method](stats, flops, ratio, min_keep, round_to, **extra)


def _check(stats: list[Tensor], flops: FlopsModel) -> None:
    sizes = flops.graph.group_sizes()
    got = [int(s.shape[0]) for s in stats]
    if got != sizes or any(s.dim() != 2 or s.shape[1] < 1 for s in stats):
        raise ValueError(f"statistics do not match the graph's groups: channel counts {got}, group sizes {sizes}")


__all__ = ["BASELINES", "l1_importance", "select_baseline", "select_l1", "select_random", "select_uniform"]

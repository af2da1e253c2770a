"""From channel scores to a physically smaller network (METHODS.md 2.5).

1. `choose_channels`: a global offset `delta` on the per-channel scores
   (hypernetwork logits, or a baseline's importances) is found by bisection so
   that the network keeping `score + delta > 0` costs as close as possible to,
   and not more than, `ratio * F_dense`. Every group keeps at least
   `max(1, ceil(min_keep * C_g))` channels; `round_to` rounds kept counts to a
   multiple (GPU-friendly widths; not applied to attention-head groups). Channels are chosen by score rank.
2. `make_structure`: the decision as a JSON-able dict: kept channel indices per
   group, and for every layer which groups index its input/output channels
   and its resulting widths.
3. `extract`: a copy of the dense network with every affected layer replaced
   by a smaller one holding the kept weight slices (conv/linear weights and
   biases, norm affine and running statistics, attention heads, the ViT class
   token and position embedding). The result is an ordinary `nn.Module`.

`rebuild` makes the same shapes from the dense architecture and a saved
structure (the weights then come from the pruned checkpoint), so a pruned
model can be loaded without this search ever having run.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from .attention import SelfAttention
from .flops_model import FlopsModel
from .graph import ATTENTION, BATCHNORM, CONV, LAYERNORM, LINEAR, PruneGraph

STRUCTURE_FILE = "structure.json"
STRUCTURE_VERSION = 1


class BudgetError(ValueError):
    """The FLOPs budget cannot be met (one-line message)."""


# --------------------------------------------------------------------------- choosing widths


def min_widths(sizes: list[int], min_keep: float) -> list[int]:
    return [max(1, math.ceil(min_keep * c)) for c in sizes]


def round_width(width: int, size: int, round_to: int, floor: int = 1) -> int:
    """Nearest multiple of `round_to` (halves up), never below `floor` (the min_keep width) nor above `size`."""
    if round_to <= 1:
        return min(size, max(width, floor))
    rounded = round_to * math.floor(width / round_to + 0.5)
    if rounded < max(floor, 1):
        rounded = round_to * math.ceil(max(floor, 1) / round_to)
    return min(size, rounded)


def group_rounding(flops: FlopsModel, round_to: int) -> list[int]:
    """`round_to` for channel groups; 1 for attention-head groups (a ViT has only a few heads per layer)."""
    return [1 if g.kind == "heads" else round_to for g in flops.graph.groups]


def fit_budget(widths_at: Callable[[float], list[int]], flops: FlopsModel, ratio: float,
               lo: float, hi: float, iterations: int = 60) -> list[int]:
    """Largest-cost widths_at(t), t in [lo, hi], whose FLOPs do not exceed ratio * F_dense.

    widths_at must be non-decreasing in t; so is the cost, and bisection applies.
    """
    target = ratio * flops.dense
    if flops(widths_at(lo)) > target:
        raise BudgetError(f"pruning.flops_ratio={ratio} is below what the minimum widths allow "
                          f"({flops(widths_at(lo)) / flops.dense:.3f} of the dense FLOPs); "
                          f"lower pruning.min_keep (or pruning.round_to) or raise the ratio")
    if flops(widths_at(hi)) <= target:
        return widths_at(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if flops(widths_at(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return widths_at(lo)


def choose_channels(scores: list[torch.Tensor], flops: FlopsModel, ratio: float, *,
                    min_keep: float = 0.05, round_to: int = 1) -> list[torch.Tensor]:
    """Kept channel indices per group (sorted) for a global threshold on `scores` meeting the budget."""
    scores = [s.detach().float().cpu() for s in scores]
    sizes = [len(s) for s in scores]
    floor = min_widths(sizes, min_keep)
    rounding = group_rounding(flops, round_to)

    def widths_at(offset: float) -> list[int]:
        return [round_width(int((s + offset > 0).sum()), c, r, f)
                for s, f, c, r in zip(scores, floor, sizes, rounding)]

    top = max(float(s.abs().max()) for s in scores) + 1.0
    widths = fit_budget(widths_at, flops, ratio, -top, top)
    return top_k(scores, widths)


def top_k(scores: list[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
    """Indices of the `width` highest scores of each group, in channel order (ties: lower index first)."""
    kept = []
    for s, k in zip(scores, widths):
        order = torch.argsort(-s.detach().float().cpu(), stable=True)[:k]
        kept.append(torch.sort(order).values)
    return kept


# --------------------------------------------------------------------------- structure


def make_structure(graph: PruneGraph, kept: list[torch.Tensor], *, arch: str, res: int,
                   num_classes: int, flops: FlopsModel) -> dict:
    widths = [len(k) for k in kept]

    def width(group, full):
        return full if group is None else widths[group]

    return {
        "version": STRUCTURE_VERSION, "arch": arch, "res": res, "num_classes": num_classes,
        "flops": float(flops(widths)), "flops_dense": flops.dense, "flops_ratio": float(flops.ratio(widths)),
        "groups": [{"name": g.name, "kind": g.kind, "size": g.size, "kept_width": len(k),
                    "residual": g.residual, "kept": [int(i) for i in k]} for g, k in zip(graph.groups, kept)],
        "layers": {name: {"kind": s.kind, "in_group": s.in_group, "out_group": s.out_group,
                          "head_group": s.head_group} for name, s in graph.layers.items()
                   if s.in_group is not None or s.out_group is not None or s.head_group is not None},
        "params": dict(graph.param_groups),
        "widths": {name: {"in": width(s.in_group, None), "out": width(s.out_group, None),
                          **({"heads": widths[s.head_group]} if s.head_group is not None else {})}
                   for name, s in graph.layers.items()
                   if s.in_group is not None or s.out_group is not None or s.head_group is not None},
    }


# --------------------------------------------------------------------------- physical extraction


def extract(model: nn.Module, structure: dict) -> nn.Module:
    """A smaller copy of `model` (a dense backbone with converted attention) keeping structure's channels."""
    if structure.get("version") != STRUCTURE_VERSION:
        raise ValueError(f"structure version {structure.get('version')} is not {STRUCTURE_VERSION}")
    model = copy.deepcopy(model)
    kept = [torch.tensor(g["kept"], dtype=torch.long) for g in structure["groups"]]
    sizes = [g["size"] for g in structure["groups"]]
    for name, slot in structure["layers"].items():
        old = model.get_submodule(name)
        new = _slice_layer(old, slot, kept, sizes)
        _replace(model, name, new)
    for name, group in structure["params"].items():
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        old = getattr(parent, attr)
        setattr(parent, attr, nn.Parameter(old.data.index_select(-1, kept[group].to(old.device)).clone(),
                                           requires_grad=old.requires_grad))
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels  # _process_input reshapes with it
    return model


def rebuild(dense_arch: nn.Module, structure: dict) -> nn.Module:
    """The pruned architecture (weights still to be loaded) from a dense one with converted attention."""
    return extract(dense_arch, structure)


def _indices(group: int | None, kept, full: int, device) -> torch.Tensor:
    return torch.arange(full, device=device) if group is None else kept[group].to(device)


def _slice_layer(old: nn.Module, slot: dict, kept, sizes) -> nn.Module:
    kind = slot["kind"]
    if kind == CONV:
        w = old.weight
        i = _indices(slot["in_group"], kept, old.in_channels, w.device)
        o = _indices(slot["out_group"], kept, old.out_channels, w.device)
        new = nn.Conv2d(len(i), len(o), old.kernel_size, old.stride, old.padding, old.dilation, 1,
                        old.bias is not None, old.padding_mode, device=w.device, dtype=w.dtype)
        new.weight.data.copy_(w.data[o][:, i])
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data[o])
        return new
    if kind == LINEAR:
        w = old.weight
        i = _indices(slot["in_group"], kept, old.in_features, w.device)
        if slot["in_group"] is not None:
            mult = old.in_features // sizes[slot["in_group"]]   # > 1 after a flatten (VGG)
            i = (i[:, None] * mult + torch.arange(mult, device=w.device)).flatten()
        o = _indices(slot["out_group"], kept, old.out_features, w.device)
        new = nn.Linear(len(i), len(o), old.bias is not None, device=w.device, dtype=w.dtype)
        new.weight.data.copy_(w.data[o][:, i])
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data[o])
        return new
    if kind == BATCHNORM:
        o = _indices(slot["out_group"], kept, old.num_features, old.running_mean.device)
        new = nn.BatchNorm2d(len(o), old.eps, old.momentum, old.affine, old.track_running_stats,
                             device=o.device, dtype=old.running_mean.dtype)
        if old.affine:
            new.weight.data.copy_(old.weight.data[o])
            new.bias.data.copy_(old.bias.data[o])
        if old.track_running_stats:
            new.running_mean.copy_(old.running_mean[o])
            new.running_var.copy_(old.running_var[o])
            new.num_batches_tracked.copy_(old.num_batches_tracked)
        return new
    if kind == LAYERNORM:
        (full,) = old.normalized_shape
        dev = old.weight.device if old.weight is not None else None
        o = _indices(slot["out_group"], kept, full, dev)
        new = nn.LayerNorm(len(o), old.eps, old.elementwise_affine, bias=old.bias is not None, device=dev)
        if old.weight is not None:
            new.weight.data.copy_(old.weight.data[o])
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data[o])
        return new
    if kind == ATTENTION:
        return _slice_attention(old, slot, kept)
    raise ValueError(f"cannot slice layer kind {kind!r}")


def _slice_attention(old: SelfAttention, slot: dict, kept) -> SelfAttention:
    w = old.in_proj_weight
    d, h_all = old.head_dim, old.num_heads
    e_in = _indices(slot["in_group"], kept, old.embed_dim, w.device)
    e_out = _indices(slot["out_group"], kept, old.embed_dim, w.device)
    heads = _indices(slot["head_group"], kept, h_all, w.device)
    if len(e_in) != len(e_out):
        raise ValueError("attention input and output widths differ: the embedding group must cover both")
    head_cols = (heads[:, None] * d + torch.arange(d, device=w.device)).flatten()       # within q, k or v
    rows = torch.cat([part * h_all * d + head_cols for part in range(3)])
    new = SelfAttention(len(e_in), len(heads), d, old.dropout, bias=old.in_proj_bias is not None)
    new = new.to(device=w.device, dtype=w.dtype)
    new.in_proj_weight.data.copy_(w.data[rows][:, e_in])
    if old.in_proj_bias is not None:
        new.in_proj_bias.data.copy_(old.in_proj_bias.data[rows])
    new.out_proj.weight.data.copy_(old.out_proj.weight.data[e_out][:, head_cols])
    if old.out_proj.bias is not None:
        new.out_proj.bias.data.copy_(old.out_proj.bias.data[e_out])
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)

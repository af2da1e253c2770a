"""The differentiable FLOPs model F(m) of a masked network (METHODS.md 2.4).

Cost is counted layer by layer from the kept input and output channels, in
multiply-accumulates (MACs), the unit pruning papers quote as "FLOPs":

* Conv2d: k_h * k_w * H_out * W_out * c_in * c_out
* Linear: tokens * c_in * c_out (a Linear after a flatten sees each kept
  channel as H*W inputs)
* attention: the q/k/v projection (tokens * E * 3 * heads * d), the two
  attention products (2 * tokens^2 * heads * d) and the output projection
  (tokens * heads * d * E)

These are exactly the operations torch's `FlopCounterMode` counts (matmuls,
convolutions and attention; norms and activations are left out on both
sides), so the model and torch's count of an extracted network agree; a test
checks it. Widths may be tensors (sums of straight-through masks), which makes
F differentiable; or plain ints, which makes it a calculator for extraction.
Spatial sizes and token counts are read from one traced forward at the
network's resolution.

F is a quadratic form in the widths: with w = (w_0, ..., w_{G-1}, 1) (the
last entry standing for a layer side that no group prunes), every term is
coef * (a * w_i) * (b * w_j), so F = w^T Q w with Q precomputed once. The
differentiable path evaluates it in a few float64 operations, exactly (all
counts are integers far below 2^53), whatever the number of layers; ints
keep the term-by-term Python sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .graph import ATTENTION, CONV, LINEAR, PruneGraph


@dataclass
class CostTerm:
    """coef * (in_mult * width_in) * (out_mult * width_out); a None group means the fixed full width."""
    layer: str
    coef: float
    in_group: int | None
    in_width: int          # full input width (used when in_group is None)
    in_mult: int           # inputs per channel of in_group (H*W after a flatten; else 1)
    out_group: int | None
    out_width: int
    out_mult: int = 1


class FlopsModel:
    def __init__(self, model: nn.Module, graph: PruneGraph, res: int):
        self.graph = graph
        self.terms: list[CostTerm] = []
        shapes = _trace_shapes(model, graph, res)
        sizes = graph.group_sizes()
        for name, slot in graph.layers.items():
            module = model.get_submodule(name)
            if slot.kind == CONV:
                h, w = shapes[name][0][-2:]
                kh, kw = module.kernel_size
                self.terms.append(CostTerm(name, kh * kw * h * w, slot.in_group, module.in_channels, 1,
                                           slot.out_group, module.out_channels))
            elif slot.kind == LINEAR:
                out_shape = shapes[name][0]
                tokens = int(torch.Size(out_shape).numel()) // module.out_features
                mult = module.in_features // sizes[slot.in_group] if slot.in_group is not None else 1
                self.terms.append(CostTerm(name, tokens, slot.in_group, module.in_features, mult,
                                           slot.out_group, module.out_features))
            elif slot.kind == ATTENTION:
                t = shapes[name][1][1]  # input (batch, tokens, embed)
                d, heads, embed = module.head_dim, module.num_heads, module.embed_dim
                self.terms += [
                    CostTerm(f"{name}.in_proj", t * 3 * d, slot.in_group, embed, 1, slot.head_group, heads),
                    CostTerm(f"{name}.attention", 2 * t * t * d, None, 1, 1, slot.head_group, heads),
                    CostTerm(f"{name}.out_proj", t * d, slot.head_group, heads, 1, slot.out_group, embed),
                ]
        self.dense = float(self(sizes))
        # F(w) = w^T Q w over w = (widths..., 1): Q[i, j] sums coef * in scale * out scale of the terms
        # reading slot i on the input side and slot j on the output side (slot G: a fixed width).
        groups = len(sizes)
        quadratic = [[0] * (groups + 1) for _ in range(groups + 1)]
        for t in self.terms:
            i, a = (groups, t.in_width) if t.in_group is None else (t.in_group, t.in_mult)
            j, b = (groups, t.out_width) if t.out_group is None else (t.out_group, t.out_mult)
            quadratic[i][j] += t.coef * a * b
        self.quadratic = torch.tensor(quadratic, dtype=torch.float64)
        self._on = {}  # Q on the devices the widths came from

    def _quadratic(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.quadratic.to(device)
        return self._on[device]

    def _tensor_total(self, widths) -> torch.Tensor:
        """F of differentiable widths (a 1-D tensor, or a list of 0-dim tensors): float64, exact for integers."""
        w = widths if isinstance(widths, torch.Tensor) else torch.stack(list(widths))
        with torch.autocast(device_type=w.device.type, enabled=False):
            q = self._quadratic(w.device)
            w = torch.cat([w.double(), q.new_ones(1)])
            return torch.dot(w, torch.mv(q, w))

    def __call__(self, widths) -> torch.Tensor | float:
        """Total MACs for per-group kept widths (ints or differentiable tensors)."""
        if isinstance(widths, torch.Tensor) or any(isinstance(w, torch.Tensor) for w in widths):
            return self._tensor_total(widths).float()
        total = 0.0
        for t in self.terms:
            w_in = t.in_width if t.in_group is None else widths[t.in_group] * t.in_mult
            w_out = t.out_width if t.out_group is None else widths[t.out_group] * t.out_mult
            total = total + t.coef * w_in * w_out
        return total

    def ratio(self, widths) -> torch.Tensor | float:
        """F(widths) / F_dense: a float32 tensor for tensor widths (divided exactly, rounded once), else a float."""
        if isinstance(widths, torch.Tensor) or any(isinstance(w, torch.Tensor) for w in widths):
            return (self._tensor_total(widths) / self.dense).float()
        return self(widths) / self.dense

    def per_layer(self, widths) -> dict[str, float]:
        out = {}
        for t in self.terms:
            w_in = t.in_width if t.in_group is None else widths[t.in_group] * t.in_mult
            w_out = t.out_width if t.out_group is None else widths[t.out_group] * t.out_mult
            out[t.layer] = out.get(t.layer, 0.0) + float(t.coef * w_in * w_out)
        return out


def _trace_shapes(model: nn.Module, graph: PruneGraph, res: int) -> dict[str, tuple]:
    """(output shape, input shape) of every costed layer in one batch-1 forward."""
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            shapes.setdefault(name, (tuple(out.shape), tuple(args[0].shape)))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n))
               for n, s in graph.layers.items() if s.kind in (CONV, LINEAR, ATTENTION)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, res, res, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


__all__ = ["FlopsModel", "CostTerm"]

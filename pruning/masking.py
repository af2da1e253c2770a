"""Apply per-group channel masks to a dense network (METHODS.md 2.3, last point).

A mask multiplies the outputs of its group's producer layers after their norm
layer, so a masked channel is exactly zero for every consumer, which is what
makes the masked network equal to the physically extracted one:

* Conv/Linear producers followed by a BatchNorm: the BatchNorm's output.
* Other producers (ViT MLP, patch embedding, attention output projection): their output.
* Attention heads: the attention module multiplies each head's output before
  the output projection (`SelfAttention.head_mask`).
* LayerNorms over a masked width (the ViT embedding stream) normalise over the
  kept channels only and output zeros elsewhere. Without this the masked
  network would normalise over a different set of channels than the
  extracted one (whose LayerNorm simply has fewer channels); with it, stream
  entries that never get a mask (class token, position embedding) cannot
  leak into kept channels either.

Masks are installed once as hooks and switched with `set(masks)`; `set(None)`
turns them off, leaving the dense network. A mask shaped for its sites (dtype,
4-D view) is made once per `set`, not once per site.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import SelfAttention
from .graph import PruneGraph


class ChannelMasks:
    def __init__(self, model: nn.Module, graph: PruneGraph):
        self.graph = graph
        self.masks: list[torch.Tensor] | None = None
        self._shaped: dict[tuple, torch.Tensor] = {}  # (group, dtype, 4-D) -> the mask as the sites read it
        self._handles = []
        self._attention: dict[int, list[SelfAttention]] = {}
        for group in graph.groups:
            for site in group.mask_sites:
                module = model.get_submodule(site)
                if group.kind == "heads":
                    self._attention.setdefault(group.index, []).append(module)
                else:
                    self._handles.append(module.register_forward_hook(self._output_hook(group.index)))
        for name, slot in graph.layers.items():
            if slot.kind == "layernorm" and slot.out_group is not None:
                module = model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._layernorm_hook(slot.out_group)))

    def set(self, masks: list[torch.Tensor] | None) -> None:
        """One 0/1 (straight-through) vector per group, or None for the dense network."""
        if masks is not None and len(masks) != len(self.graph.groups):
            raise ValueError(f"{len(masks)} masks for {len(self.graph.groups)} groups")
        self.masks = masks
        self._shaped = {}
        for index, modules in self._attention.items():
            for module in modules:
                module.head_mask = None if masks is None else masks[index]

    def remove(self) -> None:
        self.set(None)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _shaped_mask(self, index: int, dtype: torch.dtype, spatial: bool) -> torch.Tensor:
        key = (index, dtype, spatial)
        mask = self._shaped.get(key)
        if mask is None:
            mask = self.masks[index].to(dtype)
            if spatial:
                mask = mask.view(1, -1, 1, 1)
            self._shaped[key] = mask
        return mask

    def _output_hook(self, index: int):
        def hook(module, args, output):
            if self.masks is None:
                return None
            # Conv2d/BatchNorm2d: channels in dim 1; Linear: channels last
            return output * self._shaped_mask(index, output.dtype, isinstance(module, (nn.Conv2d, nn.BatchNorm2d)))
        return hook

    def _layernorm_hook(self, index: int):
        def hook(module: nn.LayerNorm, args, output):
            if self.masks is None:
                return None
            x = args[0]
            mask = self.masks[index].to(x.dtype)
            return masked_layer_norm(x, mask, module)
        return hook


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last dim restricted to the channels where mask == 1; zero elsewhere."""
    kept = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum(-1, keepdim=True) / kept
    centered = (x - mean) * mask
    var = centered.pow(2).sum(-1, keepdim=True) / kept
    y = centered * torch.rsqrt(var + ln.eps)
    if ln.weight is not None:
        y = y * ln.weight
    if ln.bias is not None:
        y = y + ln.bias
    return y * mask


__all__ = ["ChannelMasks", "masked_layer_norm"]

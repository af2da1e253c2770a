"""Per-channel weight statistics of every channel group (METHODS.md 2.2).

PASS's hypernetwork does not see the weights themselves; for every group `g`
it reads a `C_g x 5` matrix `s_g` describing each channel `c`:

    0  L1 norm   } of the concatenation of the channel's slices in ALL the
    1  L2 norm   } group's producers (a residual group has several producers,
    2  mean      } e.g. every conv3 of a ResNet stage plus the downsample conv,
    3  std       } and one channel of it is one filter of each)
    4  |gamma|: mean over the group's norm layers of |weight[c]| (0 without one)

The statistics summarise how large and how spread each channel's weights are
(a cheap proxy for its importance) in a form whose width does not depend on
the layer, so one shared MLP `phi` can embed every group (METHODS.md 2.2).
The hypernetwork standardises them per group itself (`hypernet.standardize`);
the structured baselines (`pruning.baselines`) rank channels by column 0.

A producer's slice of channel `c` is:

* Conv2d: `weight[c]` flattened (in_channels * k_h * k_w values);
* Linear: `weight[c, :]` (an attention's output projection, "<attn>.out_proj",
  is such a Linear: its rows are the embedding channels);
* SelfAttention (a "heads" group, channel = head): the head's q, k and v rows
  of `in_proj_weight` (3 * head_dim rows, all columns).

Choices the specification leaves open:

* Biases are left out: they are not part of a filter's shape, and they are
  absent in conv layers followed by BatchNorm anyway.
* The standard deviation is the population one (correction=0), so a channel
  with a single weight gets 0, not NaN.
* Column 4 averages over the group's norm layers that have an affine weight;
  norm layers without one (affine=False / elementwise_affine=False) are
  skipped, and a group with no affine norm layer gets 0.
* Statistics are computed in float32 on the weights' device and returned on
  the CPU, detached, whatever the model's dtype and device.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import SelfAttention
from .graph import ChannelGroup, PruneGraph
from .hypernet import NUM_STATS  # 5: L1, L2, mean, std, |gamma|


def group_statistics(model: nn.Module, graph: PruneGraph) -> list[Tensor]:
    """One `C_g x 5` float32 CPU tensor per group of `graph`, in group order.

    `model` must be the (converted) model `graph` was built from
    (`build_graph` replaces its attention modules in place).
    """
    with torch.no_grad():
        return [_group_stats(model, g) for g in graph.groups]


def _group_stats(model: nn.Module, group: ChannelGroup) -> Tensor:
    if not group.producers:
        raise ValueError(f"group {group.name} has no producer layer")
    rows = torch.cat([_producer_rows(model, name, group) for name in group.producers], dim=1)
    out = torch.stack([
        rows.abs().sum(dim=1),
        rows.pow(2).sum(dim=1).sqrt(),
        rows.mean(dim=1),
        rows.std(dim=1, correction=0),
        _gamma(model, group, rows.device),
    ], dim=1)
    assert out.shape == (group.size, NUM_STATS)
    return out.detach().cpu().contiguous()


def _producer_rows(model: nn.Module, name: str, group: ChannelGroup) -> Tensor:
    """`C_g x n` float32 matrix: row c is the producer's weights for channel c of the group."""
    module = model.get_submodule(name)
    if group.kind == "heads":
        if not isinstance(module, SelfAttention):
            raise TypeError(f"heads group {group.name}: producer {name} is a {type(module).__name__}, "
                            f"not a SelfAttention (call build_graph on the model first)")
        h, d = module.num_heads, module.head_dim
        w = module.in_proj_weight.detach().float()                 # (3*h*d, embed): [q heads, k heads, v heads]
        w = w.view(3, h, d, -1).permute(1, 0, 2, 3)                # (h, 3, d, embed)
        rows = w.reshape(h, -1)
    elif isinstance(module, (nn.Conv2d, nn.Linear)):
        w = module.weight.detach().float()
        rows = w.reshape(w.shape[0], -1)
    else:
        raise TypeError(f"group {group.name}: producer {name} is a {type(module).__name__}; "
                        f"only Conv2d, Linear and SelfAttention producers are supported")
    if rows.shape[0] != group.size:
        raise ValueError(f"group {group.name}: producer {name} has {rows.shape[0]} output channels, "
                         f"the group has {group.size}")
    return rows


def _gamma(model: nn.Module, group: ChannelGroup, device) -> Tensor:
    weights = []
    for name in group.norms:
        norm = model.get_submodule(name)
        if getattr(norm, "weight", None) is None:
            continue
        w = norm.weight.detach().float().reshape(-1)
        if w.numel() != group.size:
            raise ValueError(f"group {group.name}: norm {name} has {w.numel()} channels, "
                             f"the group has {group.size}")
        weights.append(w.abs().to(device))
    if not weights:
        return torch.zeros(group.size, device=device)
    return torch.stack(weights).mean(dim=0)


__all__ = ["group_statistics", "NUM_STATS"]

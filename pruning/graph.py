"""Channel groups of a network, discovered with Torch-Pruning's dependency graph (METHODS.md 2.1).

A *group* is a set of channels that must be removed together: the output
channels of its *producer* layers, the matching input channels of its
*consumer* layers, the matching entries of norm layers and of parameters added
to the stream (ViT's class token and position embedding). A residual sum ties
the producers of every block of a ResNet stage (and the embedding width of a
ViT) into one group; Torch-Pruning's graph finds those ties from a traced
forward, so there is no per-architecture table here.

Attention heads are the one thing Torch-Pruning does not expose as a group
(it treats `nn.MultiheadAttention` as a unit). Each attention module therefore
adds one *head group* whose channels are its heads; `pruning.attention`
converts the modules so that heads and embedding width can be cut separately.

`PruneGraph` is the product: groups in forward-execution order of their
first producer (the hypernetwork's time axis), and a per-layer table saying
which group indexes each layer's input and output dimension. Masking, the
FLOPs model, the weight statistics and extraction all read that table.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .attention import SelfAttention, convert_attention

# Layer kinds in PruneGraph.layers.
CONV, LINEAR, ATTENTION, BATCHNORM, LAYERNORM = "conv", "linear", "attention", "batchnorm", "layernorm"


@dataclass
class ChannelGroup:
    index: int
    name: str                     # the first producer ("layer1.0.conv1"), or "<attention>.heads"
    size: int                     # C_g: channels (or heads)
    kind: str                     # "channels" or "heads"
    producers: list[str]          # layers whose output channels this group removes
    consumers: list[str]          # layers whose input channels this group removes
    norms: list[str]              # norm layers over this group's channels
    params: list[str]             # parameters with one entry per channel on their last dim
    mask_sites: list[str]         # modules whose output is multiplied by the mask (channel dim per kind)
    residual: bool                # several producers summed into one stream


@dataclass
class LayerSlot:
    """Which groups index a layer's input and output channels (None: not pruned)."""
    name: str
    kind: str
    in_group: int | None = None
    out_group: int | None = None
    head_group: int | None = None   # attention only


@dataclass
class PruneGraph:
    groups: list[ChannelGroup]
    layers: dict[str, LayerSlot] = field(default_factory=dict)
    param_groups: dict[str, int] = field(default_factory=dict)   # parameter name -> group

    def group_sizes(self) -> list[int]:
        return [g.size for g in self.groups]


@contextlib.contextmanager
def all_trainable(model: nn.Module):
    """Every parameter requires grad inside the block; the frozen ones are frozen again after it (Torch-Pruning
    leaves out layers whose weights are frozen, and gradients need them unfrozen)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(False)


def last_linear(model: nn.Module) -> str:
    """Dotted name of the last Linear registered: the classifier of every torchvision architecture."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head")
    return linears[-1]


def _execution_order(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Index of each module's first call in one forward pass."""
    order: dict[str, int] = {}

    def record(name):
        def hook(module, args):
            order.setdefault(name, len(order))
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def build_graph(model: nn.Module, res: int, *, residual: bool = True, head: str | None = None) -> PruneGraph:
    """Find the prunable channel groups of a torchvision backbone (converts its attention in place).

    Pruned: every group whose producers are Conv2d/Linear layers (or attention
    heads), except the classifier's outputs; the stem's 3 input channels are
    never a group. `residual=False` leaves out groups with several producers
    (the residual streams of ResNets and the ViT embedding width). `head`: the classifier's dotted
    name (default: the last Linear registered, which it is in every torchvision classifier).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, res, res, device=device)
    names = {m: n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters()}
    head = head or last_linear(model)
    with all_trainable(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters detected": pruning their last dim is intended
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        tp_groups = dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear, nn.MultiheadAttention])

    raw = []
    for tp_group in tp_groups:
        producers, consumers, norms, params, attentions, size = [], [], [], [], [], None
        followers = {}  # producer -> the single module its output feeds (a norm, typically)
        for dep, idxs in tp_group:
            module, handler = dep.target.module, dep.handler.__name__
            if size is None:
                size = len(idxs)
            if isinstance(module, nn.Parameter):
                params.append(param_names[id(module)])
            elif isinstance(module, nn.MultiheadAttention):
                attentions.append(names[module])
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    raise NotImplementedError(f"grouped convolution {names[module]} is not supported")
                if handler == "prune_out_channels":
                    producers.append(names[module])
                    outs = dg.module2node[module].outputs
                    followers[names[module]] = outs[0].module if len(outs) == 1 else None
                else:
                    consumers.append(names[module])
            elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                norms.append(names[module])
        if head in producers or not (producers or attentions):
            continue  # the classifier's outputs are the classes
        # Attention in a group: its input projection consumes the stream, its output projection produces it.
        producers += [f"{a}.out_proj" for a in attentions]
        raw.append(dict(size=size, producers=producers, consumers=consumers, norms=norms, params=params,
                        attentions=attentions, followers=followers))

    convert_attention(model)
    order = _execution_order(model, example)
    groups: list[dict] = []
    for g in raw:
        residual_group = len(g["producers"]) > 1
        if residual_group and not residual:
            continue
        sites = []
        for p in g["producers"]:
            follower = g["followers"].get(p)
            if isinstance(follower, nn.BatchNorm2d) and names.get(follower) in g["norms"]:
                sites.append(names[follower])     # mask after the norm: masked channels are exactly 0
            else:
                sites.append(p)
        g.update(kind="channels", residual=residual_group, mask_sites=sites,
                 first=min(order[p] for p in g["producers"]), name=min(g["producers"], key=order.__getitem__))
        groups.append(g)
    for name, module in model.named_modules():
        if isinstance(module, SelfAttention):
            groups.append(dict(size=module.num_heads, kind="heads", producers=[name], consumers=[], norms=[],
                               params=[], attentions=[], mask_sites=[name], residual=False,
                               first=order[name], name=f"{name}.heads"))
    groups.sort(key=lambda g: g["first"])

    graph = PruneGraph(groups=[])
    for i, g in enumerate(groups):
        graph.groups.append(ChannelGroup(index=i, name=g["name"], size=g["size"], kind=g["kind"],
                                         producers=g["producers"], consumers=g["consumers"], norms=g["norms"],
                                         params=g["params"], mask_sites=g["mask_sites"], residual=g["residual"]))
    _fill_layers(model, graph, groups)
    model.train(was_training)
    return graph


def _fill_layers(model: nn.Module, graph: PruneGraph, raw_groups: list[dict]) -> None:
    """Every Conv2d/Linear/attention/norm layer, with the groups on its input and output channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            graph.layers[name] = LayerSlot(name, CONV)
        elif isinstance(module, SelfAttention):
            graph.layers[name] = LayerSlot(name, ATTENTION)
        elif isinstance(module, nn.Linear) and not _inside_attention(model, name):
            graph.layers[name] = LayerSlot(name, LINEAR)
        elif isinstance(module, nn.BatchNorm2d):
            graph.layers[name] = LayerSlot(name, BATCHNORM)
        elif isinstance(module, nn.LayerNorm):
            graph.layers[name] = LayerSlot(name, LAYERNORM)
    for g, raw in zip(graph.groups, raw_groups):
        if g.kind == "heads":
            graph.layers[g.producers[0]].head_group = g.index
            continue
        for p in g.producers:
            attention = p.rsplit(".", 1)[0] if p.endswith(".out_proj") and p.rsplit(".", 1)[0] in raw["attentions"] else None
            _set(graph.layers[attention or p], "out_group", g.index)
        for c in g.consumers:
            _set(graph.layers[c], "in_group", g.index)
        for a in raw["attentions"]:
            _set(graph.layers[a], "in_group", g.index)
        for n in g.norms:
            _set(graph.layers[n], "out_group", g.index)
        for p in g.params:
            graph.param_groups[p] = g.index


def _set(slot: LayerSlot, attr: str, index: int) -> None:
    old = getattr(slot, attr)
    if old is not None and old != index:
        raise RuntimeError(f"layer {slot.name}: {attr} claimed by groups {old} and {index}")
    setattr(slot, attr, index)


def _inside_attention(model: nn.Module, name: str) -> bool:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return isinstance(model.get_submodule(parent), SelfAttention) if parent else False

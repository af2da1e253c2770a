"""Base of the structured methods: build the channel graph, rank channels, meet the FLOPs budget.

A one-shot criterion only implements `importance(job, graph)` (one score per channel of every group,
higher = keep); `search` builds the graph and the FLOPs model and keeps channels by one global threshold
on those scores, bisected so the network costs at most `pruning.flops_ratio` of the dense FLOPs
(`extract.choose_channels`, the same rule PASS's extraction uses). A method that decides otherwise
overrides `choose` (random, uniform) or `search` itself (PASS).
"""
from __future__ import annotations

from .registry import STRUCTURED, ChannelDecision, Method


def channel_graph(job):
    """(PruneGraph, FlopsModel) of the job's backbone (converts attention in place)."""
    from ..flops_model import FlopsModel
    from ..graph import build_graph

    cfg = job.cfg
    graph = build_graph(job.backbone, cfg.data.res, residual=cfg.pruning.residual, head=job.head_name)
    return graph, FlopsModel(job.backbone, graph, cfg.data.res)


def budget(cfg) -> dict:
    """The constraints every structured method meets alike: per-group floor and width rounding."""
    return {"min_keep": cfg.pruning.min_keep, "round_to": cfg.pruning.round_to}


class StructuredMethod(Method):
    family = STRUCTURED

    def search(self, job) -> ChannelDecision:
        graph, flops = channel_graph(job)
        return ChannelDecision(graph=graph, flops=flops, kept=self.choose(job, graph, flops))

    def choose(self, job, graph, flops) -> list:
        """Kept channel indices per group: a global threshold on `importance`, bisected to the budget."""
        from ..extract import choose_channels

        return choose_channels(self.importance(job, graph), flops, job.cfg.pruning.flops_ratio, **budget(job.cfg))

    def importance(self, job, graph) -> list:
        raise NotImplementedError(f"{type(self).__name__} implements neither importance nor choose")


def torch_pruning_importance(job, graph, importance) -> list:
    """Per group of `graph`, the channel scores of a Torch-Pruning importance criterion (tp.importance.*)
    over the group Torch-Pruning couples to the group's first producer (every layer, norm and parameter
    whose channels go with it), reduced to one score per channel as the criterion says."""
    import torch
    import torch_pruning as tp
    from torch import nn

    from ..graph import all_trainable

    backbone = job.backbone
    heads = [g.name for g in graph.groups if g.kind != "channels"]
    if heads:
        raise ValueError(f"method={job.cfg.method.name} scores channel groups with Torch-Pruning; this network has "
                         f"attention-head groups ({heads[0]}, ...): use pass, l1, random or uniform for it")
    with all_trainable(backbone):  # Torch-Pruning leaves out layers whose weights are frozen
        device = next(backbone.parameters()).device
        example = torch.zeros(1, 3, job.cfg.data.res, job.cfg.data.res, device=device)
        dependencies = tp.DependencyGraph().build_dependency(backbone, example_inputs=example)
        scores = []
        for g in graph.groups:
            root = backbone.get_submodule(g.producers[0])
            handler = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
            group = dependencies.get_pruning_group(root, handler, idxs=list(range(g.size)))
            scores.append(importance(group).detach().float().cpu())
    return scores

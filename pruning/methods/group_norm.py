"""`group_norm`: DepGraph's group-level norm (Fang et al., CVPR 2023): the L2 norm of every parameter slice
that goes with a channel across its whole coupled group (producers, consumers, norms), as Torch-Pruning's
GroupMagnitudeImportance computes it; one global threshold meets the FLOPs budget."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import register, setting
from .structured import StructuredMethod, torch_pruning_importance


@dataclass
class GroupNormSettings:
    p: int = setting(2, "the norm's degree (2: DepGraph's group L2 norm; 1: group L1)")


@register
class GroupNorm(StructuredMethod):
    name = "group_norm"
    about = "one-shot: DepGraph's group-level norm of each channel over its coupled layers (Torch-Pruning)"
    settings = GroupNormSettings

    def problems(self, cfg) -> list[str]:
        p = cfg[self.name].p
        return [] if p in (1, 2) else [f"group_norm.p={p}: must be 1 or 2"]

    def importance(self, job, graph) -> list:
        import torch_pruning as tp

        return torch_pruning_importance(job, graph, tp.importance.GroupMagnitudeImportance(p=job.cfg[self.name].p))

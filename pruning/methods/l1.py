"""`l1`: channels ranked by the L1 norm of their producer filters, normalised per group (METHODS.md 4)."""
from __future__ import annotations

from .registry import register
from .structured import StructuredMethod, budget


@register
class L1(StructuredMethod):
    name = "l1"
    about = "one-shot: per-group-normalised L1 norm of each channel's filters, one global threshold"

    def choose(self, job, graph, flops) -> list:
        from ..baselines import select_l1
        from ..stats import group_statistics

        return select_l1(group_statistics(job.backbone, graph), flops, job.cfg.pruning.flops_ratio, **budget(job.cfg))

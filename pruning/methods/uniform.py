"""`uniform`: the same keep fraction in every group, channels by L1 rank inside it (METHODS.md 4)."""
from __future__ import annotations

from .registry import register
from .structured import StructuredMethod, budget


@register
class Uniform(StructuredMethod):
    name = "uniform"
    about = "one-shot: the same keep fraction in every group, channels by L1 rank"

    def choose(self, job, graph, flops) -> list:
        from ..baselines import select_uniform
        from ..stats import group_statistics

        return select_uniform(group_statistics(job.backbone, graph), flops, job.cfg.pruning.flops_ratio,
                              **budget(job.cfg))

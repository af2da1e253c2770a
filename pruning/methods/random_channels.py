"""`random`: exactly the per-group widths `l1` keeps, with channels drawn at random (METHODS.md 4)."""
from __future__ import annotations

from .registry import register
from .structured import StructuredMethod, budget


@register
class RandomChannels(StructuredMethod):
    name = "random"
    about = "one-shot: l1's per-group widths, channels drawn at random (seeded by seed)"

    def choose(self, job, graph, flops) -> list:
        from ..baselines import select_random
        from ..stats import group_statistics

        return select_random(group_statistics(job.backbone, graph), flops, job.cfg.pruning.flops_ratio,
                             **budget(job.cfg), seed=job.cfg.seed)

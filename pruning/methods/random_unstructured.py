"""`random_unstructured`: a uniformly random mask of exactly the density, seeded by `seed` (METHODS.md 4)."""
from __future__ import annotations

from .registry import register
from .unstructured import OneShotMasks


@register
class RandomMasks(OneShotMasks):
    name = "random_unstructured"
    about = "one-shot: a uniformly random mask at the density (seeded by seed)"
    threshold = "random"

    def masks(self, job, weights: dict) -> dict:
        from ..scores import random_masks

        return random_masks(weights, job.cfg.pruning.density, seed=job.cfg.seed)

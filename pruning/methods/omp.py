"""`omp`: one-shot global magnitude pruning, the largest |W| over all scored layers (METHODS.md 4)."""
from __future__ import annotations

from .registry import register
from .unstructured import OneShotMasks


@register
class Omp(OneShotMasks):
    name = "omp"
    about = "one-shot: the largest |W| over all scored layers"
    threshold = "global"

    def masks(self, job, weights: dict) -> dict:
        from ..scores import magnitude_masks

        return magnitude_masks(weights, job.cfg.pruning.density)

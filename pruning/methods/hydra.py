"""`hydra`: HYDRA, VPNs' score search without the prompt; configs/method/hydra.yaml sets its per-layer
threshold (vpns.threshold=layer) and search schedule (METHODS.md 4)."""
from __future__ import annotations

from .registry import register
from .unstructured import ScoreSearch


@register
class Hydra(ScoreSearch):
    name = "hydra"
    about = "trains one score per weight without a prompt (per-layer threshold by default)"

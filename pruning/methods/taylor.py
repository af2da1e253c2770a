"""`taylor`: channels ranked by first-order Taylor importance, |sum over the group of w * dL/dw|-style, as
Torch-Pruning's GroupTaylorImportance computes it (Molchanov et al., CVPR 2019), from the loss gradient
averaged over `taylor.batches` training batches per process and over all processes; one global threshold
meets the FLOPs budget."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import register, setting
from .structured import StructuredMethod, torch_pruning_importance


@dataclass
class TaylorSettings:
    batches: int = setting(8, "training batches per process the loss gradient is averaged over (center crop)")


@register
class Taylor(StructuredMethod):
    name = "taylor"
    about = "one-shot: first-order Taylor importance of each channel group (Torch-Pruning), gradients over a few batches"
    settings = TaylorSettings

    def problems(self, cfg) -> list[str]:
        batches = cfg[self.name].batches
        return [] if batches >= 1 else [f"taylor.batches={batches}: must be at least 1"]

    def importance(self, job, graph) -> list:
        import torch_pruning as tp

        from ..gradients import clear_gradients, search_gradients

        search_gradients(job, job.cfg[self.name].batches, self.name)
        try:
            return torch_pruning_importance(job, graph, tp.importance.GroupTaylorImportance())
        finally:
            clear_gradients(job.backbone)

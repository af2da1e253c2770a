"""`snip`: SNIP's connection sensitivity (Lee et al., ICLR 2019), |w * dL/dw| of every scored weight from
the loss gradient averaged over `snip.batches` training batches per process and over all processes; the
largest over all scored layers are kept at `pruning.density` (one-shot, like OMP with another score)."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import register, setting
from .unstructured import OneShotMasks


@dataclass
class SnipSettings:
    batches: int = setting(4, "training batches per process the loss gradient is averaged over (center crop)")


@register
class Snip(OneShotMasks):
    name = "snip"
    about = "one-shot: connection sensitivity |w * dL/dw| over a few batches, global top-k at the density"
    settings = SnipSettings
    threshold = "global"

    def problems(self, cfg) -> list[str]:
        batches = cfg[self.name].batches
        return [] if batches >= 1 else [f"snip.batches={batches}: must be at least 1"]

    def masks(self, job, weights) -> dict:
        from ..gradients import clear_gradients, search_gradients
        from ..scores import keep_top

        search_gradients(job, job.cfg[self.name].batches, self.name)
        sensitivity = [(w.weight.detach() * w.weight.grad).abs() for w in weights]
        clear_gradients(job.backbone)
        masks = keep_top(sensitivity, job.cfg.pruning.density, "global")
        return {w.key: m.cpu() for w, m in zip(weights, masks)}

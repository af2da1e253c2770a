"""`vpns`: VPNs, a visual prompt trained jointly with one score per weight; the top scores at
`pruning.density` are the masks (METHODS.md 3). `vpns.use_prompt=false` is its no-prompt ablation: the
same threshold and the same optimizer steps per batch, without the prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .registry import register, setting
from .unstructured import ScoreSearch, ablation_views

THRESHOLDS = ("global", "layer")   # pruning.scores.THRESHOLDS (tests/test_config.py checks)


@dataclass
class VpnsSettings:
    threshold: str = setting("global", "global: one score threshold over all scored layers; layer: the same density per layer")
    dual_step: bool = setting(True, "after the step on the prompted batch, a second step on the same batch without the prompt")
    use_prompt: bool = setting(True, "ablation (method=vpns): false = no prompt in search and finetune, all else the same "
                                     "(threshold, optimizer steps per batch: with dual_step both see the plain batch)")
    prompt_lr: Optional[float] = setting(None, "peak learning rate of the prompt in the search (none: search.lr, the one "
                                               "rate METHODS.md gives scores and prompt)")
    exclude_first: bool = setting(False, "do not score (prune) the first conv / patch embedding")
    exclude_classifier: bool = setting(False, "do not score (prune) the classifier")


@register
class Vpns(ScoreSearch):
    name = "vpns"
    about = "trains a visual prompt with one score per weight (backbone frozen); top scores at the density"
    settings = VpnsSettings
    choices = {"threshold": THRESHOLDS}

    def search_prompt(self, cfg) -> bool:
        return bool(cfg[self.name].use_prompt)

    def finetune_prompt(self, cfg) -> bool:
        return bool(cfg[self.name].use_prompt) and bool(cfg.finetune.prompt)

    def finetune_views(self, cfg, model, prompt) -> list | None:
        if prompt is None and not cfg[self.name].use_prompt:  # the ablation keeps VPNs' steps per batch
            return ablation_views(cfg[self.name].dual_step)
        return super().finetune_views(cfg, model, prompt)

    def problems(self, cfg) -> list[str]:
        rate = cfg[self.name].prompt_lr
        return [] if rate is None or rate > 0 else [f"vpns.prompt_lr={rate}: must be positive (or null: search.lr)"]

    def note(self, cfg) -> str:
        return "" if cfg[self.name].use_prompt else " (no-prompt ablation)"

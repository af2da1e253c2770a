"""Base of the unstructured methods: one boolean mask per scored weight at `pruning.density` (METHODS.md 3, 4).

Two kinds share it:

* `OneShotMasks`: a criterion computes the masks from the dense network (and, for data-driven ones,
  a few batches) in `masks(job, weights)`; nothing trains.
* `ScoreSearch`: one trainable score per weight (pruning.scores.ScoreMasks) searched with every weight
  and norm affine frozen, optionally with the prompt; the top scores are the masks.

The score-mask settings every unstructured method reads (threshold, which layers are scored, the dual
step) sit in the `vpns` config section, which VPNs declares (pruning/methods/vpns.py); the name stays for
the commands and recipes that already use it.
"""
from __future__ import annotations

import contextlib

from .registry import UNSTRUCTURED, MaskDecision, Method

SCORES_SECTION = "vpns"


def prompt_views(model, dual_step: bool) -> list:
    """The optimizer steps of one batch: prompted, then (dual step) the same batch without the prompt."""
    views = [("prompt", contextlib.nullcontext)]
    if dual_step:
        views.append(("no_prompt", model.without_input_transform))
    return views


def ablation_views(dual_step: bool) -> list | None:
    """No prompt, as many optimizer steps per batch as VPNs takes, each on the plain batch, so that an
    ablation differs from VPNs in the prompt only (None: fit's single plain step)."""
    return [("plain", contextlib.nullcontext), ("plain_again", contextlib.nullcontext)] if dual_step else None


class UnstructuredMethod(Method):
    family = UNSTRUCTURED

    # what to do when a global threshold empties whole layers (the search stage warns with it)
    empty_layer_hint = f"{SCORES_SECTION}.threshold=layer keeps every layer at the density"

    def scores_cfg(self, cfg):
        return cfg[SCORES_SECTION]

    def finetune_views(self, cfg, model, prompt) -> list | None:
        return prompt_views(model, self.scores_cfg(cfg).dual_step) if prompt is not None else None

    def scored_weights(self, job) -> dict:
        from ..scores import scorable_weights

        s = self.scores_cfg(job.cfg)
        return scorable_weights(job.backbone, exclude_first=s.exclude_first, exclude_classifier=s.exclude_classifier)


class OneShotMasks(UnstructuredMethod):
    """Masks chosen once from the dense network; `threshold` names the rule in the summary."""
    threshold = "global"

    def search(self, job) -> MaskDecision:
        from ..classifier import ImageClassifier

        masks = self.masks(job, self.scored_weights(job))
        return MaskDecision(masks=masks, model=job.prepare(ImageClassifier(job.backbone)), threshold=self.threshold)

    def masks(self, job, weights: dict) -> dict:
        raise NotImplementedError


class ScoreSearch(UnstructuredMethod):
    """Trains one score per weight (and the prompt, when the method has one) with the backbone frozen."""
    trains = True

    def search_views(self, cfg, model, prompt) -> list | None:
        return self.finetune_views(cfg, model, prompt)

    def search(self, job) -> MaskDecision:
        from ..classifier import ImageClassifier
        from ..scores import ScoreMasks

        cfg, s, prompt = job.cfg, self.scores_cfg(job.cfg), job.prompt
        for p in job.backbone.parameters():  # weights and norm affine frozen; the norms' statistics still update
            p.requires_grad_(False)
        if job.train_head:
            for p in job.backbone.get_submodule(job.head_name).parameters():
                p.requires_grad_(True)
        scores = ScoreMasks(job.backbone, cfg.pruning.density, threshold=s.threshold, exclude_first=s.exclude_first,
                            exclude_classifier=s.exclude_classifier)
        model = job.prepare(ImageClassifier(job.backbone, prompt))
        trainable = [p for p in model.parameters() if p.requires_grad]
        if prompt is not None and s.prompt_lr is not None:  # the prompt at its own rate, the rest at search.lr
            own = {id(p) for p in prompt.parameters()}
            trainable = [{"params": [p for p in trainable if id(p) not in own]},
                         {"params": list(prompt.parameters()), "lr": s.prompt_lr}]
        views = self.search_views(cfg, model, prompt)
        job.say(f"search: {len(scores.weights)} scored layers, {scores.total():,} scored weights, "
                f"{s.threshold} threshold, prompt {prompt.effective_parameters if prompt else 0:,} effective "
                f"parameters, {len(views) if views else 1} optimizer step(s) per batch{self.note(cfg)}")
        result = job.fit(model, trainable, views=views)
        return MaskDecision(masks=scores.remove(), model=model, threshold=s.threshold, fit=result)

"""Which stages a run's `stage=...` stands for, decided from its config alone.

Torch-free on purpose: the launcher, `stage=status` and the SLURM submitter
consult the plan before (or without) importing the training code, so that
saying "nothing to do" or printing a table costs no torch/FFCV import.
"""
from __future__ import annotations

from omegaconf import DictConfig

from .config.schema import STRUCTURED_METHODS, UNSTRUCTURED_METHODS


def has_weights(weights: str | None) -> bool:
    """Whether `model.weights` names any weights ("none", "" and null mean a random initialisation)."""
    return weights is not None and str(weights).strip().lower() not in ("", "none")


def plan(cfg: DictConfig) -> list[str]:
    """The stages `stage=...` stands for. Pruning starts from given weights, another run's dense stage
    (`dense_run`, a sweep's shared one) or this run's own dense stage."""
    if cfg.stage != "all":
        return [cfg.stage]
    if cfg.method.name == "dense":
        return ["dense", "eval"]
    pretrained = has_weights(cfg.model.weights) or bool(cfg.dense_run)
    return ([] if pretrained else ["dense"]) + ["search", "finetune", "eval"]


def pruning_method_problem(method: str, stage: str) -> str | None:
    """Why the search/finetune `stage` cannot run for `method` (None: it can); the stages serve the
    structured and the unstructured pruning methods. trainer.stages raises it as StageNotImplemented."""
    if method == "dense":
        return f"method=dense has no {stage} stage"
    if method not in STRUCTURED_METHODS + UNSTRUCTURED_METHODS:
        return f"stage={stage} for method={method} is not implemented"
    return None

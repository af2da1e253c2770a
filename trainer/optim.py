"""Optimizers and per-step learning-rate schedules built from a stage's schedule config."""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig


def make_optimizer(params, s: DictConfig) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0,
                               weight_decay=s.weight_decay)
    if s.optimizer == "adam":  # L2 penalty in the gradient, as the VPNs reference trains its scores
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def lr_factor(step: int, s: DictConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (linear warm-up, then the schedule)."""
    total = max(1, s.epochs * steps_per_epoch)
    warmup = int(s.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if s.schedule == "constant":
        return 1.0
    if s.schedule == "step":
        return 0.1 ** (step // (s.step_size * steps_per_epoch))
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, s: DictConfig, steps_per_epoch: int):
    # Stepped every optimizer step, so a resume mid-epoch restores the exact lr.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s, steps_per_epoch))

"""Loss gradients of a frozen-in-place network over a few batches, for data-driven one-shot criteria.

Taylor (channels) and SNIP (weights) rank by |w * dL/dw|. The gradient here is the mean cross-entropy's,
averaged over `batches` batches per process and over all processes (summed with `all_reduce_sum`, then
divided), so every process holds the same gradient and takes the same decision. The network runs in eval
mode: normalisation uses its running statistics and none of them change (the searched network is the
dense one until the masks apply).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import ImageClassifier
from .graph import all_trainable


def average_loss_gradients(backbone: nn.Module, batches: Iterable, all_reduce_sum: Callable,
                           world_size: int = 1) -> int:
    """Fill `.grad` of every backbone parameter with the average gradient; returns the images seen here."""
    model = ImageClassifier(backbone)
    was_training = model.training
    model.eval()
    params = list(backbone.parameters())
    for p in params:
        p.grad = None
    count, seen = 0, 0
    try:
        with all_trainable(backbone):
            for images, labels, *_ in batches:
                F.cross_entropy(model(images), labels).backward()
                count, seen = count + 1, seen + len(labels)
        if count == 0:
            raise ValueError("no batches to take gradients over")
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad)
            p.grad.div_(count * world_size)
    finally:
        model.train(was_training)
    return seen


def clear_gradients(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def search_gradients(job, batches: int, method: str) -> None:
    """`average_loss_gradients` of a search job's backbone (on the job's device) over `batches` batches per
    process, logged with the number of images they came from."""
    job.backbone.to(job.device)
    seen = average_loss_gradients(job.backbone, job.batches(batches), job.all_reduce_sum, job.world_size)
    job.say(f"search: {method}: loss gradient over {seen * job.world_size:,} training images")

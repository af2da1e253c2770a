"""Measured inference latency: what a pruned network really buys, next to its FLOPs."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def measure_latency(model: nn.Module, res: int, *, batch: int = 32, repeats: int = 15, warmup: int = 3,
                    device: str = "cpu") -> dict:
    """Median wall time of one forward pass of a `batch` x 3 x `res` x `res` input (eval mode).

    The model is copied to `device` (CPU by default, so figures compare across
    machines without GPUs); the median of `repeats` timed runs after `warmup`
    untimed ones resists the noise of a shared machine.
    """
    model = copy.deepcopy(model).to(device).eval()
    x = torch.rand(batch, 3, res, res, device=device)
    times = []
    for i in range(warmup + repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_ms": 1000 * statistics.median(times), "batch": batch, "repeats": repeats,
            "device": device, "threads": torch.get_num_threads()}

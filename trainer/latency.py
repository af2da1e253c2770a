"""Measured inference latency: what a pruned network really buys, next to its FLOPs."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], res: int, *, batch: int = 32, repeats: int = 15,
                    warmup: int = 3, device: str = "cpu") -> dict[str, dict]:
    """Median wall time of one forward pass of a `batch` x 3 x `res` x `res` input, per model (eval mode).

    The models are copied to `device` (CPU by default, so figures compare across
    machines without GPUs) and timed in turns, one pass of each per round, so
    that load from other processes on a shared machine hits all of them alike;
    the median of `repeats` rounds after `warmup` untimed ones is reported.
    """
    # One memory format for all (a GPU-trained network may be channels_last, its dense twin not).
    copies = {name: copy.deepcopy(m).to(device).to(memory_format=torch.contiguous_format).eval()
              for name, m in models.items()}
    x = torch.rand(batch, 3, res, res, device=device)
    # Wait for the measured GPU, not the current one (cuda:1 measured from a process whose current is cuda:0).
    sync = torch.cuda.synchronize if x.device.type == "cuda" else lambda device: None
    times: dict[str, list[float]] = {name: [] for name in copies}
    for i in range(warmup + repeats):
        for name, model in copies.items():
            sync(x.device)
            start = time.perf_counter()
            model(x)
            sync(x.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1000 * statistics.median(t), "batch": batch, "repeats": repeats,
                   "device": device, "threads": torch.get_num_threads()} for name, t in times.items()}

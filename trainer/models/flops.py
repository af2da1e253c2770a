"""Counting a model's cost with torch's own FLOP counter."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(model: nn.Module, res: int) -> int:
    """Multiply-accumulates of one forward pass on one `res` x `res` image.

    Pruning papers quote "FLOPs" as multiply-accumulates (ResNet-50: 4.1 G), so
    that is what summaries call `flops`; torch counts 2 FLOPs per MAC.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, 3, res, res, device=param.device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops()) // 2

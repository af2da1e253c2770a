"""Counting a model's cost with torch's own FLOP counter."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch registers its attention formula for the CUDA kernels only; on CPU,
# scaled_dot_product_attention runs this kernel and would count as zero.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, also counting attention on CPU."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


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
    with flop_counter() as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops()) // 2

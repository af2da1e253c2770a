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


@torch.no_grad()
def weight_macs(model: nn.Module, res: int, keys: list[str]) -> dict[str, int]:
    """Per-image multiply-accumulates spent on each weight in `keys` ("layer1.0.conv1.weight").

    Every weight entry of a Conv2d/Linear is used once per output position (pixel or token),
    so a layer costs positions x weight entries; an unstructured mask that skipped its zero
    weights would save (1 - density) of that. MultiheadAttention's `in_proj_weight` is used once
    per token.
    """
    modules = {key.rpartition(".")[0]: key for key in keys}
    positions: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and f"{name}.out_proj" in modules:
            # MultiheadAttention applies out_proj's weight itself, without calling out_proj: one use per token.
            hook = lambda m, args, kwargs, out, name=name: positions.__setitem__(f"{name}.out_proj", args[0].shape[-2])
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        if name not in modules:
            continue
        if isinstance(module, nn.MultiheadAttention):
            hook = lambda m, args, kwargs, out, name=name: positions.__setitem__(name, args[0].shape[-2])
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        else:
            channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            hook = lambda m, args, out, name=name, c=channels: positions.__setitem__(name, out[0].numel() // c)
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    try:
        model(torch.zeros(1, 3, res, res, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    params = dict(model.named_parameters())
    return {key: positions[module] * params[key].numel() for module, key in modules.items()}

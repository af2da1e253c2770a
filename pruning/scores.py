"""Per-weight score masks for unstructured sparsity (METHODS.md section 3: VPNs, HYDRA).

Every scored weight `W` gets a score tensor `S` of the same shape, registered
on the same module as `<name>_score` (so `conv1.weight` keeps its name and
gains `conv1.weight_score`; the torchvision module keeps its class and
structure). During the module's forward, `W` is replaced by `W * M` with

    M = 1[|S| > tau],   tau = k-th smallest |S| over all scored layers,
    k = floor((1 - density) * N)

(`threshold="layer"`: the same per layer). Exactly `N - k` weights are kept:
ties at the threshold are broken by position, so the achieved density meets
the target to the weight. The mask is recomputed whenever a score changes (an
optimizer step, a checkpoint load), i.e. after every optimizer step, before
the next forward. The backward is straight-through: d loss / d S gets the
gradient of the mask entry, through |S| (the sign of S), as in HYDRA/VPNs.

The recomputation runs on the device without a host sync (no value is read
back, no shape depends on the data; see "exact top-k" below) and in a fixed
number of operations, whatever the number of layers: the scores are copied
into one padded buffer, selected there, and the float masks the forward
multiplies by are views of one buffer updated in place.

Scored: the `weight` of every `Conv2d` and `Linear`, and the fused q/k/v
projection `in_proj_weight` of `nn.MultiheadAttention` (its output projection
is already a `Linear`, though one the attention module reads directly, so its
substitution hooks sit on the attention module). `exclude_first` skips the
first such layer (the stem conv, or ViT's patch embedding),
`exclude_classifier` the last `Linear`.

`FixedMasks` is the finetune side: it zeroes the masked weights once and
masks their gradients, so they stay exactly zero under SGD and Adam(W) and
the forward costs nothing extra.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

SCORE_SUFFIX = "_score"
THRESHOLDS = ("global", "layer")


@dataclass(frozen=True)
class ScoredWeight:
    module_name: str     # dotted module path ("layer1.0.conv1")
    param_name: str      # "weight" or "in_proj_weight"
    module: nn.Module
    reader: nn.Module    # the module whose forward reads the weight (MultiheadAttention reads out_proj's)

    @property
    def key(self) -> str:
        """The weight's state-dict key."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def weight(self) -> torch.Tensor:
        return self.module._parameters[self.param_name]


def scorable_weights(model: nn.Module, *, exclude_first: bool = False,
                     exclude_classifier: bool = False) -> list[ScoredWeight]:
    """The weights VPNs scores, in registration order (the classifier is the last `Linear`)."""
    # nn.MultiheadAttention passes out_proj.weight to its functional forward without calling out_proj.
    readers = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            found.append(ScoredWeight(name, "weight", module, readers.get(id(module), module)))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            found.append(ScoredWeight(name, "in_proj_weight", module, module))
    if not found:
        raise ValueError(f"{type(model).__name__} has no Conv2d/Linear weights to score")
    linears = [i for i, w in enumerate(found) if isinstance(w.module, nn.Linear)]
    drop = set()
    if exclude_first:
        drop.add(0)
    if exclude_classifier and linears:
        drop.add(linears[-1])
    kept = [w for i, w in enumerate(found) if i not in drop]
    if not kept:
        raise ValueError("excluding the first layer and the classifier leaves no weights to score")
    return kept


def pruned_count(n: int, density: float) -> int:
    """k = floor((1 - density) * n): how many of n weights are masked.

    Computed on the decimal the density was written as (0.9, not 0.9000000000000000222),
    so that 1 - 0.9 is exactly 0.1 and the kept count is exactly ceil(density * n).
    """
    return min(n, max(0, math.floor((1 - Fraction(repr(float(density)))) * n)))


# --------------------------------------------------------------------------- exact top-k, no host sync
#
# "Keep the n - k largest values; at the threshold, the first positions" is computed on the device with
# no value read back by the host (no .item(), no nonzero(), no data-dependent shape), so that on a GPU the
# step that recomputes the masks never waits for the device. The result is the boolean mask of the
# reference definition (tau = kthvalue(k); keep values > tau, then the first ties at tau in position
# order until n - k are kept), bit for bit:
#
# 1. Keys: a float's bits read as an integer, negative values mapped to -(their magnitude bits), so that
#    keys order exactly as the values do and -0.0 == +0.0 (NaN is not supported). Non-negative values
#    (|S|) need no mapping: the float32/float64 buffer is read as integers in place.
# 2. tau, the k-th smallest key, by radix selection: a histogram (index_add_ of ones into 65536 integer
#    bins) of the keys' top 16 bits gives the bucket holding rank k (cumsum + searchsorted); a histogram
#    of the next 16 bits inside that bucket gives tau (64-bit keys take four passes, 16-bit keys one),
#    with the number of keys below tau and equal to it.
# 3. Ties: of the keys equal to tau the first `deficit = below + equal - k` are kept. The keys lie in
#    blocks of _BLOCK; per-block tie counts locate the block j holding the last kept tie; the blocks
#    before j keep key >= tau and the others key > tau (one comparison against a per-block threshold);
#    block j alone is resolved with a cumulative count.
#
# Layouts are padded to whole blocks with the bit pattern of all ones (a NaN), whose key is below every
# value's: selecting rank k + padding over a padded layout selects rank k over the values, and padding
# is never kept and never a tie.

_BLOCK = 4096
_DIGIT = 16
_BINS = 1 << _DIGIT
_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
              torch.float64: torch.int64}


def _order_keys(bits: torch.Tensor, out: torch.Tensor, nonnegative: bool) -> None:
    """Integer keys (into `out`, int32 or int64) of floats given as their bits: keys order as the floats."""
    if nonnegative:  # sign bit clear (padding aside): the bits order as the values
        out.copy_(bits)
        return
    magnitude = (bits & torch.iinfo(bits.dtype).max).to(out.dtype)
    torch.where(bits < 0, -magnitude, magnitude, out=out)


def _kth_key(key: torch.Tensor, bits: int, rank: int, work: torch.Tensor, ones: torch.Tensor):
    """(tau, below, equal): the rank-th smallest key (1-based), the number of keys below it and equal to it.

    0-dim device tensors. `work`: an integer tensor like `key`; `ones`: int64 ones of `key`'s length.
    """
    device = key.device
    prefix = below = hist = pick = None
    for d in range(max(1, bits // _DIGIT)):
        shift = bits - _DIGIT * (d + 1)
        if d == 0:  # the top digit (signed): bins 0 .. _BINS - 1 after the offset
            if shift:
                torch.bitwise_right_shift(key, shift, out=work)
                work.add_(_BINS // 2)
            else:
                torch.add(key, _BINS // 2, out=work)
            hist = torch.zeros(_BINS, dtype=torch.int64, device=device).index_add_(0, work, ones)
            target = rank
        else:  # the next digit inside the bucket found so far; every other key lands in bin 0 or _BINS + 1
            if shift:
                torch.bitwise_right_shift(key, shift, out=work)
                work.sub_((prefix << _DIGIT) - 1)
            else:
                torch.sub(key, (prefix << _DIGIT) - 1, out=work)
            work.clamp_(0, _BINS + 1)
            hist = torch.zeros(_BINS + 2, dtype=torch.int64, device=device).index_add_(0, work, ones)[1:_BINS + 1]
            target = rank - below
        cum = hist.cumsum(0)
        pick = torch.searchsorted(cum, target)  # the first bin whose cumulative count reaches the target
        under = cum.take(pick) - hist.take(pick)  # take: indexing by a 0-dim tensor would read it back
        below = under if d == 0 else below + under
        digit = pick.to(key.dtype)
        prefix = digit - _BINS // 2 if d == 0 else (prefix << _DIGIT) + digit
    return prefix, below, hist.take(pick)


def _keep_blocks(blocks: torch.Tensor, tau: torch.Tensor, deficit: torch.Tensor, out: torch.Tensor,
                 block_index: torch.Tensor) -> None:
    """out = key > tau, or key == tau for the first `deficit` such keys; `blocks`, `out`: (rows, _BLOCK)."""
    ties = (blocks == tau).sum(1, dtype=torch.int64)
    cum = ties.cumsum(0)
    j = torch.searchsorted(cum, deficit).clamp_(max=blocks.shape[0] - 1)  # the block of the last kept tie
    rest = deficit - (cum.take(j) - ties.take(j))                        # ties kept inside block j
    threshold = tau - (block_index < j).to(blocks.dtype)                 # before j: key >= tau; else key > tau
    torch.gt(blocks, threshold.unsqueeze(1), out=out)
    j = j.view(1)
    row = blocks.index_select(0, j)
    tie = row == tau
    out.index_copy_(0, j, (row > tau) | (tie & (tie.cumsum(1) <= rest)))


class _TopK:
    """Exact top-k masks of tensors of fixed shapes, the workspace kept between calls (see the notes above).

    threshold="global": one selection over all the tensors; "layer": one per tensor. `select` copies the
    values into a padded layout and returns float 0/1 masks in their dtype, views of one buffer updated in
    place by the next call (`keep_masks`: the same as new boolean tensors).
    """

    def __init__(self, shapes: list, density: float, threshold: str):
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold {threshold!r}: choose from {', '.join(THRESHOLDS)}")
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [s.numel() for s in self.shapes]
        padded = [max(1, -(-n // _BLOCK)) * _BLOCK for n in self.sizes]
        self.starts = [sum(padded[:i]) for i in range(len(padded))]
        self.total = sum(padded)
        # (start, length, values in it, how many of them are masked) of every selection
        if threshold == "global":
            n = sum(self.sizes)
            self.selections = [(0, self.total, n, pruned_count(n, density))]
        else:
            self.selections = [(s, p, n, pruned_count(n, density)) for s, p, n in zip(self.starts, padded, self.sizes)]
        self.device = self.dtype = self.absolute = None

    def _allocate(self, device: torch.device, dtype: torch.dtype, absolute: bool) -> None:
        if dtype not in _BITS_VIEW:
            raise TypeError(f"top-k selection of {dtype} values: only floating point values are supported")
        self.device, self.dtype, self.absolute = device, dtype, absolute
        self.bits = torch.finfo(dtype).bits
        view = _BITS_VIEW[dtype]
        self.values = torch.empty(self.total, dtype=dtype, device=device)
        self.values.view(view).fill_(-1)  # padding: all ones
        self.value_views = [self.values[s:s + n].view(shape) for s, n, shape in zip(self.starts, self.sizes, self.shapes)]
        # Non-negative float32/float64: the buffer's bits are the keys (padding: -1). Otherwise keys of their own.
        self.key = self.values.view(view) if absolute and self.bits > 16 else None
        key_dtype = torch.int64 if self.bits == 64 else torch.int32  # int32 at least: index_add_ takes no int16
        if self.key is None:
            self.key = torch.empty(self.total, dtype=key_dtype, device=device)
        self.pad_key = -1 if absolute else -torch.iinfo(view).max
        self.work = torch.empty(self.total, dtype=key_dtype, device=device)
        self.keep = torch.empty(self.total, dtype=torch.bool, device=device)
        self.mask = torch.zeros(self.total, dtype=dtype, device=device)
        self.masks = [self.mask[s:s + n].view(shape) for s, n, shape in zip(self.starts, self.sizes, self.shapes)]
        self.ones = {length: torch.ones((), dtype=torch.int64, device=device).expand(length)
                     for _, length, _, _ in self.selections}
        self.block_index = torch.arange(self.total // _BLOCK, device=device)

    @torch.no_grad()
    def select(self, values: list[torch.Tensor], *, absolute: bool = False) -> list[torch.Tensor]:
        """Float 0/1 masks keeping the largest `values` (of |values| with absolute=True)."""
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
        if (values[0].device, dtype, absolute) != (self.device, self.dtype, self.absolute):
            self._allocate(values[0].device, dtype, absolute)
        torch._foreach_copy_(self.value_views, values)
        if absolute:
            torch._foreach_abs_(self.value_views)
        if self.key.data_ptr() != self.values.data_ptr():
            _order_keys(self.values.view(_BITS_VIEW[dtype]), self.key, nonnegative=absolute)
        for start, length, n, k in self.selections:
            key, keep = self.key[start:start + length], self.keep[start:start + length]
            if k == 0:
                torch.gt(key, self.pad_key, out=keep)
            elif k == n:
                keep.zero_()
            else:
                rank = k + length - n  # the padding sorts first
                tau, below, equal = _kth_key(key, self.bits, rank, self.work[start:start + length],
                                             self.ones[length])
                _keep_blocks(key.view(-1, _BLOCK), tau, below + equal - rank, keep.view(-1, _BLOCK),
                             self.block_index[:length // _BLOCK])
        self.mask.copy_(self.keep)
        return self.masks

    def keep_masks(self) -> list[torch.Tensor]:
        """The latest selection as new boolean tensors."""
        return [self.keep[s:s + n].view(shape).clone() for s, n, shape in zip(self.starts, self.sizes, self.shapes)]


def keep_top(values: list[torch.Tensor], density: float, threshold: str = "global") -> list[torch.Tensor]:
    """Masks keeping the largest `values`: one global threshold over all tensors, or one per tensor.

    Exactly n - floor((1 - density) * n) are kept (per tensor with threshold="layer"); at the threshold,
    the first positions (in the order of `values`, each flattened) are kept. No host sync.
    """
    topk = _TopK([v.shape for v in values], density, threshold)
    topk.select(values)
    return topk.keep_masks()


class _MaskedWeight(torch.autograd.Function):
    """Forward: W * M (M the float 0/1 mask). Backward: the gradient of M passed straight through to |S|,
    i.e. d S = (d(W * M) * W) * sign(S), and d W = d(W * M) * M when W trains. The same operations, in the
    same order, as autograd through `W * M` with M = straight-through(|S|)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        # The mask is a view of a buffer the next recomputation overwrites: saved only when W needs it.
        ctx.save_for_backward(weight, score, mask if ctx.needs_input_grad[0] else None)
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if grad is None:
            return None, None, None
        weight, score, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_score = (grad * weight).to(score.dtype) * score.sgn() if ctx.needs_input_grad[1] else None
        return grad_weight, grad_score, None


def initial_scores(weight: torch.Tensor) -> torch.Tensor:
    """sqrt(6 / fan_in) * W / max|W| (per layer)."""
    w = weight.detach()
    fan_in = w[0].numel()
    return math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(torch.finfo(w.dtype).tiny)


class ScoreMasks:
    """Attach trainable scores to a model's weights; its forward then uses the masked weights."""

    def __init__(self, model: nn.Module, density: float, *, threshold: str = "global",
                 exclude_first: bool = False, exclude_classifier: bool = False):
        if not 0 < density <= 1:
            raise ValueError(f"density {density}: must be in (0, 1]")
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold {threshold!r}: choose from {', '.join(THRESHOLDS)}")
        self.density, self.threshold = density, threshold
        self.weights = scorable_weights(model, exclude_first=exclude_first, exclude_classifier=exclude_classifier)
        self._topk = _TopK([w.weight.shape for w in self.weights], density, threshold)
        self._cache_key, self._masks, self._forward_masks = None, None, None
        # Every optimizer step counts as a change: DeepSpeed writes its updated weights back through
        # `.data`, which no version counter sees.
        self._steps = 0
        self._handles = [register_optimizer_step_post_hook(self._count_step)]
        for i, w in enumerate(self.weights):
            w.module.register_parameter(w.param_name + SCORE_SUFFIX, nn.Parameter(initial_scores(w.weight)))
            self._handles.append(w.reader.register_forward_pre_hook(functools.partial(self._use_masked_weight, i)))
            self._handles.append(w.reader.register_forward_hook(functools.partial(self._restore_weight, i), always_call=True))
        # Around the whole model's forward: check the scores for a change once, not once per layer.
        self._handles.append(model.register_forward_pre_hook(self._begin_forward))
        self._handles.append(model.register_forward_hook(self._end_forward, always_call=True))

    # scores and masks ------------------------------------------------------
    def scores(self) -> list[nn.Parameter]:
        return [w.module._parameters[w.param_name + SCORE_SUFFIX] for w in self.weights]

    def _count_step(self, optimizer, args, kwargs) -> None:
        self._steps += 1

    def invalidate(self) -> None:
        """Recompute the masks at the next use, changed scores or not (benchmarks time the recomputation)."""
        self._cache_key = None

    def float_masks(self) -> list[torch.Tensor]:
        """The current masks as float 0/1 tensors in the scores' dtype, recomputed only when a score changed.

        Views of one buffer that the next recomputation overwrites in place: copy to keep one. "Changed": an
        optimizer step was taken, or a score's storage or in-place version counter moved (`copy_`,
        `load_state_dict`); edits through `.data` alone are not seen. Under ZeRO-3 (scores sharded between
        forwards) the global threshold needs every score: they are gathered the way DeepSpeed intends, and
        the storage is not part of the key (it is new at every gather).
        """
        scores = self.scores()
        sharded = any(hasattr(s, "ds_id") for s in scores)
        key = (self._steps, None if sharded else tuple((s.data_ptr(), s._version) for s in scores))
        if key != self._cache_key:
            with torch.no_grad(), _gathered(scores if sharded else []):
                self._topk.select(scores, absolute=True)
            self._cache_key, self._masks = key, None
        return self._topk.masks

    def masks(self) -> list[torch.Tensor]:
        """The current hard masks (bool, new tensors), recomputed only when a score tensor changed (see
        `float_masks`); the same list while the scores are unchanged."""
        floats = self.float_masks()
        if self._masks is None:
            self._masks = [m != 0 for m in floats]
        return self._masks

    def masks_by_key(self) -> dict[str, torch.Tensor]:
        return {w.key: m for w, m in zip(self.weights, self.masks())}

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks()))

    def total(self) -> int:
        return sum(w.weight.numel() for w in self.weights)

    # the forward substitution ---------------------------------------------
    def _begin_forward(self, module: nn.Module, args) -> None:
        self._forward_masks = self.float_masks()

    def _end_forward(self, module: nn.Module, args, output) -> None:
        self._forward_masks = None

    def _use_masked_weight(self, i: int, reader: nn.Module, args) -> None:
        w = self.weights[i]
        masks = self._forward_masks if self._forward_masks is not None else self.float_masks()
        score = w.module._parameters[w.param_name + SCORE_SUFFIX]
        # An instance attribute shadows the registered parameter while the reader runs:
        # the parameter itself (its name, state dict, optimizer entry) is untouched.
        w.module.__dict__[w.param_name] = _MaskedWeight.apply(w.weight, score, masks[i])

    def _restore_weight(self, i: int, reader: nn.Module, args, output) -> None:
        w = self.weights[i]
        w.module.__dict__.pop(w.param_name, None)

    def remove(self) -> dict[str, torch.Tensor]:
        """Detach hooks and scores from the model; returns the final masks by weight key."""
        final = {k: m.cpu() for k, m in self.masks_by_key().items()}
        for h in self._handles:
            h.remove()
        for w in self.weights:
            del w.module._parameters[w.param_name + SCORE_SUFFIX]
            w.module.__dict__.pop(w.param_name, None)
        self._handles = []
        return final


def _gathered(params: list[torch.Tensor]):
    """DeepSpeed ZeRO-3: the whole of the given sharded parameters for the duration (read-only)."""
    if not params:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus
    return GatheredParameters([p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE])


def resolve_weight(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, param_name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if param_name not in module._parameters:
        raise KeyError(f"{key}: no such parameter")
    return module, param_name


def zero_masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Set the masked entries of every masked weight to zero; returns (weight, mask on its device) pairs."""
    pairs = []
    for key, mask in masks.items():
        module, name = resolve_weight(model, key)
        weight = module._parameters[name]
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask for {key} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        with torch.no_grad():
            weight.mul_(mask)
        pairs.append((weight, mask))
    return pairs


class FixedMasks:
    """Keep masked weights at exactly zero while the rest trains (finetune with a fixed mask)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        # The gradient of a masked entry is zero, so momentum and weight decay never move it.
        self._handles = [weight.register_hook(functools.partial(_mask_gradient, mask))
                         for weight, mask in zero_masked(model, masks)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _mask_gradient(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * mask


def density_report(masks: dict[str, torch.Tensor]) -> dict:
    """Achieved density overall and per layer, with the counts behind it."""
    kept = {k: int(m.sum()) for k, m in masks.items()}
    sizes = {k: m.numel() for k, m in masks.items()}
    total = sum(sizes.values())
    return {"kept": sum(kept.values()), "total": total, "density": sum(kept.values()) / max(1, total),
            "per_layer": {k: kept[k] / sizes[k] for k in masks}}


def magnitude_masks(weights: list[ScoredWeight], density: float, threshold: str = "global") -> dict[str, torch.Tensor]:
    """OMP: keep the largest |W| (one-shot global magnitude pruning)."""
    masks = keep_top([w.weight.detach().abs() for w in weights], density, threshold)
    return {w.key: m.cpu() for w, m in zip(weights, masks)}


def random_masks(weights: list[ScoredWeight], density: float, seed: int) -> dict[str, torch.Tensor]:
    """Uniformly random weights, exactly ceil(density * N) of them over all scored layers."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.rand(w.weight.shape, generator=gen) for w in weights]
    return {w.key: m for w, m in zip(weights, keep_top(values, density, "global"))}

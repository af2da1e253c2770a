"""PASS's prompt-conditioned hypernetwork over channel groups (METHODS.md sections 2.2-2.4).

The hypernetwork reads the frozen backbone's per-channel statistics and the
visual prompt and emits one logit per channel of every prunable group:

    x_g      = mean_c phi(s_g[c]) + E[g]                     step input (2.2)
    (h, c)_0 = PromptEncoder(program * frame_mask)           initial state (2.3)
    (h, c)_g = LSTMCell(x_g, (h, c)_{g-1})                   recurrence over groups
    logit_g  = head_g(h_g) + beta * (s_g @ u)                per-channel logits (2.4)

`straight_through_mask` turns logits into exact 0/1 masks whose gradient is
that of sigmoid(logits), and `budget_loss` pushes the masked FLOPs ratio
towards the target.

Choices the specification leaves open, and why:

* Statistics are standardised per group and per column, so `phi` and the
  prior see inputs on the same scale whatever the layer; they are
  non-persistent buffers because they are recomputed from the frozen backbone
  every run (refresh them with `set_stats`), so they stay out of checkpoints.
* Heads start with weights ~ N(0, 0.01^2) and bias `init_bias` (+3). With
  |h| <= 1 and hidden=128 the head's weight term is at most ~0.1 in size,
  so every initial logit is about +3 (sigmoid 0.95): the search starts from
  the full network, as METHODS.md requires. The weights are small but not
  zero: zero weights would make every channel of a group identical at the
  start and would cut all gradient to the LSTM, the prompt encoder and `phi`
  until the heads had moved.
* The channel prior starts at exactly zero with u = 0, beta = 1: u still gets
  gradient (beta * s_g^T dL/dlogit) from the first step, whereas beta = 0 would
  give u no gradient at all. beta's own gradient is zero only until u moves.
* `recurrent=False` ablation: no state is carried between groups; each group
  is decided from its own input, h_g = tanh(W x_g + b + h0), with W shared
  across groups (the step embedding tells the groups apart) and h0 the first
  half of the prompt encoder's output (zeros without a prompt). Adding h0
  keeps the prompt conditioning every group, so this ablation removes the
  recurrence only, not the prompt.
* `use_stats=False` ignores the statistics completely: x_g = E[g] and no prior
  term; `phi`, `u` and `beta` are not even created, so the ablation has no
  dead parameters.
* With `use_prompt=False` a prompt passed to `forward` is ignored, so callers
  can pass it the same way for every configuration.
* `forward` runs in float32 with autocast disabled, so the masks do not
  depend on the mixed-precision setting and are identical on every rank.

How it runs (a handful of operations per step, whatever the number of groups):

* The statistics of all groups are one packed `sum_g C_g x 5` matrix; `phi`
  runs once over it and the per-group means are one product with a constant
  `G x sum_g C_g` averaging matrix.
* The step inputs do not depend on the recurrence, so the LSTM runs over the
  whole sequence of groups as one `torch.lstm` call (one fused kernel:
  oneDNN on CPU, cuDNN on GPU) with the LSTMCell's own parameters.
* The heads are packed: one `sum_g C_g x H` weight and one bias, channel c
  of group g reading h_g (`packed_logits`). They start from exactly the
  values per-group `Linear` heads would (the same random draws); state dicts
  with per-group `heads.<g>.weight/bias` load into them.
* These give the same function as a loop over groups, up to float rounding.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_STATS = 5  # per channel: L1 norm, L2 norm, mean, std, |gamma|
POOL = 8  # the prompt encoder pools the prompt image to 3 x POOL x POOL
BUDGET_LOSSES = ("square", "abs", "log")


def standardize(stats: Tensor) -> Tensor:
    """Standardise each column of a `C x 5` statistics matrix over the channels.

    (x - mean) / (std + 1e-6) with the population std; a column whose values
    are all equal (which includes C == 1) becomes exactly zero rather than
    rounding noise divided by 1e-6.
    """
    if stats.dim() != 2 or stats.shape[1] != NUM_STATS or stats.shape[0] == 0:
        raise ValueError(f"statistics must be C x {NUM_STATS} with C >= 1, got {tuple(stats.shape)}")
    stats = stats.detach().float()
    if not torch.isfinite(stats).all():
        raise ValueError("statistics contain NaN or infinity")
    mean = stats.mean(dim=0, keepdim=True)
    std = stats.std(dim=0, correction=0, keepdim=True)
    constant = (stats == stats[:1]).all(dim=0, keepdim=True)
    return torch.where(constant, torch.zeros_like(stats), (stats - mean) / (std + 1e-6))


class PromptEncoder(nn.Module):
    """Maps the prompt image `program * frame_mask` (3 x S x S) to the LSTM's initial (h0, c0)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.proj = nn.Linear(3 * POOL * POOL, 2 * hidden)

    def forward(self, prompt_image: Tensor) -> tuple[Tensor, Tensor]:
        if prompt_image.dim() != 3 or prompt_image.shape[0] != 3 or min(prompt_image.shape[1:]) < POOL:
            raise ValueError(f"prompt image must be 3 x S x S with S >= {POOL}, got {tuple(prompt_image.shape)}")
        pooled = F.adaptive_avg_pool2d(prompt_image, POOL).reshape(1, -1)
        h0, c0 = torch.tanh(self.proj(pooled)).chunk(2, dim=1)
        return h0, c0


class PassHypernetwork(nn.Module):
    """Emits per-channel logits for every prunable group (see the module docstring)."""

    def __init__(self, group_sizes: list[int], stats: list[Tensor], *, embed_dim: int = 64, hidden: int = 128,
                 init_bias: float = 3.0, recurrent: bool = True, use_stats: bool = True, use_prompt: bool = True):
        super().__init__()
        if not group_sizes or any(c < 1 for c in group_sizes):
            raise ValueError(f"group sizes must be a non-empty list of positive ints, got {group_sizes}")
        self.group_sizes = [int(c) for c in group_sizes]
        self.hidden, self.recurrent = hidden, recurrent
        self.use_stats, self.use_prompt = use_stats, use_prompt

        self._check_stats(stats)
        for g, s in enumerate(stats):
            self.register_buffer(f"stats_{g}", standardize(s), persistent=False)
        sizes = torch.tensor(self.group_sizes)
        groups = len(self.group_sizes)
        # Packed over the groups: the statistics, each channel's group, and the per-group averaging matrix.
        self.register_buffer("stats", torch.cat([self.group_stats(g) for g in range(groups)]), persistent=False)
        self.register_buffer("channel_group", torch.repeat_interleave(torch.arange(groups), sizes),
                             persistent=False)
        average = torch.zeros(groups, int(sizes.sum()))
        average[self.channel_group, torch.arange(average.shape[1])] = (1.0 / sizes.float())[self.channel_group]
        self.register_buffer("group_average", average, persistent=False)

        self.step_embedding = nn.Embedding(groups, embed_dim)
        if use_stats:
            self.phi = nn.Sequential(nn.Linear(NUM_STATS, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))
            # u = 0, beta = 1: the prior contributes exactly zero at the start, yet u gets gradient at once.
            self.u = nn.Parameter(torch.zeros(NUM_STATS))
            self.beta = nn.Parameter(torch.ones(1))  # 1-D: DeepSpeed broadcasts and shards parameters as bytes
        self.encoder = PromptEncoder(hidden) if use_prompt else None
        if recurrent:
            self.cell = nn.LSTMCell(embed_dim, hidden)
        else:
            self.step = nn.Linear(embed_dim, hidden)
        # One head per group, drawn as per-group Linear layers would be, packed into one weight and bias.
        heads = [self._head(hidden, c, init_bias) for c in self.group_sizes]
        self.head_weight = nn.Parameter(torch.cat([h.weight.detach() for h in heads]))
        self.head_bias = nn.Parameter(torch.cat([h.bias.detach() for h in heads]))
        self._register_load_state_dict_pre_hook(_pack_heads, with_module=True)

    @staticmethod
    def _head(hidden: int, channels: int, init_bias: float) -> nn.Linear:
        head = nn.Linear(hidden, channels)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.constant_(head.bias, init_bias)
        return head

    def _check_stats(self, stats: list[Tensor]) -> None:
        if len(stats) != len(self.group_sizes):
            raise ValueError(f"{len(stats)} statistics tensors for {len(self.group_sizes)} groups")
        for g, (s, c) in enumerate(zip(stats, self.group_sizes)):
            if tuple(s.shape) != (c, NUM_STATS):
                raise ValueError(f"group {g}: statistics of shape {tuple(s.shape)}, expected ({c}, {NUM_STATS})")

    def set_stats(self, stats: list[Tensor]) -> None:
        """Re-standardise fresh raw statistics and copy them into the buffers."""
        self._check_stats(stats)
        for g, s in enumerate(stats):
            buffer = self.group_stats(g)
            buffer.copy_(standardize(s).to(buffer.device))
        self.stats.copy_(torch.cat([self.group_stats(g) for g in range(len(self.group_sizes))]))

    def group_stats(self, g: int) -> Tensor:
        """The standardised `C_g x 5` statistics of group `g`."""
        return getattr(self, f"stats_{g}")

    def _initial_state(self, prompt_image: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.encoder is None:
            zeros = self.step_embedding.weight.new_zeros(1, self.hidden)
            return zeros, zeros
        if prompt_image is None:
            raise ValueError("this hypernetwork is prompt-conditioned (use_prompt=True): pass the prompt image")
        return self.encoder(prompt_image.float())

    def _hidden_states(self, x: Tensor, h0: Tensor, c0: Tensor) -> Tensor:
        """h_g of every group (G x H): the LSTMCell stepped over the groups, as one LSTM call."""
        cell = self.cell
        with warnings.catch_warnings():
            # cuDNN would rather have the weights in one buffer (nn.LSTM's layout); it copies these four.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            out, _, _ = torch.lstm(x.unsqueeze(1), (h0.unsqueeze(0), c0.unsqueeze(0)),
                                   (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh),
                                   True, 1, 0.0, self.training, False, False)
        return out.squeeze(1)

    def packed_logits(self, prompt_image: Tensor | None = None) -> Tensor:
        """The logits of every channel of every group, concatenated in group order (1-D float32)."""
        device_type = self.step_embedding.weight.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            h0, c0 = self._initial_state(prompt_image)
            x = self.step_embedding.weight                            # x_g = E[g] ...
            if self.use_stats:
                x = x + self.group_average @ self.phi(self.stats)     # ... + mean_c phi(s_g[c])
            if self.recurrent:
                h = self._hidden_states(x, h0, c0)
            else:
                h = torch.tanh(self.step(x) + h0)
            logits = (self.head_weight * h.index_select(0, self.channel_group)).sum(1) + self.head_bias
            if self.use_stats:
                logits = logits + self.beta * (self.stats @ self.u)
            return logits

    def forward(self, prompt_image: Tensor | None = None) -> list[Tensor]:
        """Per-group logits, a list of 1-D float32 tensors of length C_g."""
        return list(self.packed_logits(prompt_image).split(self.group_sizes))

    def group_widths(self, masks: Tensor) -> Tensor:
        """Per-group sums of a packed per-channel vector (the kept widths of packed masks), float32,
        differentiable, never autocast."""
        with torch.autocast(device_type=masks.device.type, enabled=False):
            widths = masks.new_zeros(len(self.group_sizes), dtype=torch.float32)
            return widths.index_add(0, self.channel_group, masks.float())


def _pack_heads(module: PassHypernetwork, state_dict: dict, prefix: str, *args) -> None:
    """Load a state dict written with one `heads.<g>` Linear per group into the packed heads."""
    first = f"{prefix}heads.0.weight"
    if first not in state_dict or f"{prefix}head_weight" in state_dict:
        return
    groups = len(module.group_sizes)
    for name in ("weight", "bias"):
        state_dict[f"{prefix}head_{name}"] = torch.cat([state_dict.pop(f"{prefix}heads.{g}.{name}")
                                                        for g in range(groups)])


def straight_through_mask(logits: Tensor) -> Tensor:
    """Exact 0/1 mask (sigmoid(logits) > 0.5) in the forward pass, gradient of sigmoid(logits) in the backward.

    The forward value is exact: for hard = 0 it is (0 - q) + q = 0, and for
    hard = 1 we have q > 0.5, so 1 - q is exact in floating point and adding q back gives 1.
    """
    q = torch.sigmoid(logits)
    hard = (q > 0.5).to(q.dtype)
    return hard - q.detach() + q


def budget_loss(ratio: Tensor, target: float, kind: str = "square", weight: float = 2.0) -> Tensor:
    """Penalty on the FLOPs ratio F(m)/F_dense against `target`.

    square: weight * (ratio - target)^2; abs: weight * |ratio - target|;
    log: weight * log(max(ratio, target) / target), which is zero at or below the target.
    """
    if kind == "square":
        return weight * (ratio - target) ** 2
    if kind == "abs":
        return weight * (ratio - target).abs()
    if kind == "log":
        if target <= 0:
            raise ValueError(f"the log budget loss needs a positive target, got {target}")
        return weight * torch.log(torch.clamp(ratio, min=target) / target)
    raise ValueError(f"budget loss kind {kind!r}: choose from {', '.join(BUDGET_LOSSES)}")

"""The PASS search network: frozen backbone + visual prompt + hypernetwork, as ONE module.

One module, so the engine (DDP now, DeepSpeed later) wraps, synchronises and
checkpoints the hypernetwork, its prompt encoder and the prompt like any other
parameters. Each forward:

1. the hypernetwork reads the prompt (`program * frame_mask`) and the frozen
   backbone's weight statistics and gives per-group channel logits;
2. straight-through masks `m = 1[q > 0.5]` are applied to the backbone;
3. the prompted, masked network classifies the batch;
4. the differentiable FLOPs model gives `F(m) / F_dense` and the budget loss.

It returns `(logits, budget_loss)`; the training loop adds the budget term to
the cross-entropy (METHODS.md 2.4). The backbone is frozen (no gradients,
BatchNorm in eval mode unless `pass.bn_train`).
"""
from __future__ import annotations

import torch
from torch import nn

from .classifier import ImageClassifier
from .flops_model import FlopsModel
from .graph import PruneGraph, build_graph
from .hypernet import PassHypernetwork, budget_loss, straight_through_mask
from .masking import ChannelMasks
from .prompt import PadPrompt
from .stats import group_statistics


class PassSearchNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, *, res: int, prompt: PadPrompt | None, pass_cfg, flops_ratio: float,
                 residual: bool = True, head: str | None = None):
        super().__init__()
        self.graph: PruneGraph = build_graph(backbone, res, residual=residual, head=head)  # converts attention in place
        for p in backbone.parameters():   # after the graph: Torch-Pruning skips frozen layers
            p.requires_grad_(False)
        self.flops = FlopsModel(backbone, self.graph, res)
        self.classifier = ImageClassifier(backbone, prompt)
        self.prompt = prompt
        self.hypernet = PassHypernetwork(
            self.graph.group_sizes(), group_statistics(backbone, self.graph), embed_dim=pass_cfg.embed_dim,
            hidden=pass_cfg.hidden, init_bias=pass_cfg.init_bias, recurrent=pass_cfg.recurrent,
            use_stats=pass_cfg.use_stats, use_prompt=prompt is not None)
        self.masks = ChannelMasks(backbone, self.graph)
        self.target, self.loss_kind, self.loss_weight = flops_ratio, pass_cfg.budget_loss, pass_cfg.budget_weight
        self.bn_train = pass_cfg.bn_train
        self._last: dict[str, torch.Tensor] = {}

    @property
    def backbone(self) -> nn.Module:
        return self.classifier.backbone

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(hypernetwork + encoder parameters, prompt parameters)."""
        prompt = list(self.prompt.parameters()) if self.prompt is not None else []
        return list(self.hypernet.parameters()), prompt

    def prompt_image(self) -> torch.Tensor | None:
        return self.prompt.program * self.prompt.frame_mask if self.prompt is not None else None

    def logits(self) -> list[torch.Tensor]:
        """Per-group channel logits of the current hypernetwork and prompt."""
        return self.hypernet(self.prompt_image())

    def forward(self, images: torch.Tensor):
        # All groups at once: packed logits, one straight-through mask vector, per-group views of it.
        masks = straight_through_mask(self.hypernet.packed_logits(self.prompt_image()))
        self.masks.set(list(masks.split(self.hypernet.group_sizes)))
        try:
            out = self.classifier(images)
        finally:
            self.masks.set(None)   # never leave a stale (graph-holding) mask installed
        ratio = self.flops.ratio(self.hypernet.group_widths(masks))
        loss = budget_loss(ratio, self.target, self.loss_kind, self.loss_weight)
        self._last = {"mask_flops_ratio": ratio.detach(), "budget_loss": loss.detach()}
        return out, loss

    @property
    def last(self) -> dict[str, float]:
        """Mask FLOPs ratio and budget loss of the latest forward (read when logging: no per-step sync)."""
        return {k: float(v) for k, v in self._last.items()}

    @torch.no_grad()
    def hard_masks(self) -> list[torch.Tensor]:
        return [(l > 0).float() for l in self.logits()]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not self.bn_train:
            self.backbone.eval()   # frozen backbone: BatchNorm keeps its running statistics
        return self

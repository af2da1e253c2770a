"""The one module every stage trains: input scaling and normalisation in front of a backbone.

Part of the pruning library (PASS wraps its backbone in it; trainer.models re-exports it).

The loaders hand over uint8 pixels; normalisation lives here rather than in
the loader so that a visual prompt (`input_transform`) can be applied to
[0, 1] pixels first, as METHODS.md requires, and so that it runs on the GPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, input_transform: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.input_transform = input_transform if input_transform is not None else nn.Identity()
        # Not persistent: the checkpoints hold only learned state.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @contextlib.contextmanager
    def without_input_transform(self):
        """Temporarily skip the prompt (METHODS.md 1: accuracy is reported with and without it)."""
        transform, self.input_transform = self.input_transform, nn.Identity()
        try:
            yield self
        finally:
            self.input_transform = transform

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images
        x = self.input_transform(x)
        return self.backbone((x - self.mean) / self.std)

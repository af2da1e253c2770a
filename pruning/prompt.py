"""The visual prompt shared by PASS and VPNs (METHODS.md section 1).

A learned pattern added to every image on an outer frame of the input:

    prompted = clamp(x + program * frame_mask, 0, 1)       x in [0, 1]

`ImageClassifier` applies it as its `input_transform`, before the mean/std
normalisation, which is where METHODS.md puts it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_VARIANTS = ("pad", "expand", "full")


def default_pad(size: int) -> int:
    """Frame width: 16 pixels at 224, scaled with the resolution."""
    return round(16 * size / 224)


class PadPrompt(nn.Module):
    """Pad prompt of a `size` x `size` input.

    variant="pad": the prompt covers a frame of width `pad` over the image.
    variant="expand": the image is first shrunk to size - 2*pad and zero-padded
    back, so the frame no longer hides image content.
    variant="full": the prompt covers the whole image.
    """

    def __init__(self, size: int, pad: int | None = None, variant: str = "pad"):
        super().__init__()
        if variant not in PROMPT_VARIANTS:
            raise ValueError(f"prompt variant {variant!r}: choose from {', '.join(PROMPT_VARIANTS)}")
        pad = default_pad(size) if pad is None else pad
        if not 0 < 2 * pad < size and variant != "full":
            raise ValueError(f"prompt frame width {pad} does not fit a {size}px input")
        self.size, self.pad, self.variant = size, pad, variant
        self.program = nn.Parameter(torch.zeros(3, size, size))
        mask = torch.ones(1, size, size)
        if variant != "full":
            mask[:, pad:size - pad, pad:size - pad] = 0
        self.register_buffer("frame_mask", mask, persistent=False)

    @property
    def effective_parameters(self) -> int:
        """Entries of `program` that can change an output: 3 * (S^2 - (S - 2p)^2), or 3 * S^2 for `full`."""
        return int(3 * self.frame_mask.sum().item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"prompt built for {self.size}px inputs got {tuple(x.shape[-2:])}")
        if self.variant == "expand":
            inner = self.size - 2 * self.pad
            x = F.pad(F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False,
                                    antialias=True), (self.pad,) * 4)
        return torch.clamp(x + self.program * self.frame_mask, 0, 1)

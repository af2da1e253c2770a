"""The visual pad prompt (METHODS.md section 1)."""
from __future__ import annotations

import pytest
import torch

from pruning.prompt import PadPrompt, default_pad
from trainer.models import ImageClassifier


def test_default_frame_and_effective_count():
    assert default_pad(224) == 16 and default_pad(32) == 2
    prompt = PadPrompt(224)
    assert prompt.effective_parameters == 3 * (224 ** 2 - 192 ** 2)
    assert PadPrompt(32, variant="full").effective_parameters == 3 * 32 * 32


def test_zero_prompt_is_identity_and_only_the_frame_changes():
    prompt = PadPrompt(32, pad=4)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(prompt(x), x)
    with torch.no_grad():
        prompt.program.fill_(0.5)
    y = prompt(x)
    inside = (slice(None), slice(None), slice(4, 28), slice(4, 28))
    assert torch.equal(y[inside], x[inside])
    assert torch.equal(y[..., :4, :], torch.clamp(x[..., :4, :] + 0.5, 0, 1))
    assert y.min() >= 0 and y.max() <= 1


def test_expand_shrinks_the_image_into_the_frame():
    prompt = PadPrompt(32, pad=4, variant="expand")
    y = prompt(torch.ones(1, 3, 32, 32))
    assert torch.all(y[..., :4, :] == 0) and torch.allclose(y[..., 4:28, 4:28], torch.ones(1, 3, 24, 24))


def test_gradient_reaches_only_frame_entries():
    prompt = PadPrompt(16, pad=2)
    prompt(torch.full((1, 3, 16, 16), 0.5)).sum().backward()
    grad_mask = prompt.program.grad.abs().sum(0) > 0
    assert int(grad_mask.sum()) * 3 == prompt.effective_parameters


def test_bad_arguments_and_use_inside_the_classifier():
    with pytest.raises(ValueError):
        PadPrompt(32, variant="corner")
    with pytest.raises(ValueError):
        PadPrompt(8, pad=4)
    model = ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2)), PadPrompt(16))
    assert model(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)).shape == (2, 2)

"""Frequency label mapping (METHODS.md section 3): reuse a larger classifier for a smaller label set.

When the dense network's classifier has more outputs than the dataset has
classes (an ImageNet head on a 10-class set), run the prompted network over
the training set once, count how often each true class is predicted as each
output, and assign classes to outputs greedily: the largest count in the
table first, then the largest among the classes and outputs still free, and
so on (ILM-VP's `generate_label_mapping_by_frequency`). The classifier is then
cut to the chosen rows, so the network's logits are the mapped outputs in
class order and the result is an ordinary `num_classes`-way torchvision model.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def prediction_counts(model: nn.Module, batches, num_classes: int, num_outputs: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_classes, num_outputs) table: how often class c was predicted as output o."""
    counts = torch.zeros(num_classes, num_outputs, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    for batch in batches:
        images, labels = batch[0], batch[1]
        logits = model(images)
        if isinstance(logits, tuple):
            logits = logits[0]
        predicted = logits.argmax(dim=1)
        counts.view(-1).index_add_(0, labels.to(device).long() * num_outputs + predicted.to(device),
                                   torch.ones_like(predicted, dtype=torch.int64, device=device))
    model.train(was_training)
    return counts


def greedy_mapping(counts: torch.Tensor) -> list[int]:
    """The output assigned to each class: repeatedly take the largest count among free classes and outputs."""
    num_classes, num_outputs = counts.shape
    if num_classes > num_outputs:
        raise ValueError(f"cannot map {num_classes} classes onto {num_outputs} outputs")
    table = counts.detach().to("cpu", torch.float64).clone()
    mapping = [-1] * num_classes
    for _ in range(num_classes):
        flat = int(table.argmax())  # the first maximum: deterministic on ties
        c, o = divmod(flat, num_outputs)
        mapping[c] = o
        table[c, :] = -1
        table[:, o] = -1
    return mapping


def map_classifier(linear: nn.Linear, mapping: list[int]) -> nn.Linear:
    """A `len(mapping)`-way Linear whose row c is row mapping[c] of `linear`."""
    if len(set(mapping)) != len(mapping) or min(mapping) < 0 or max(mapping) >= linear.out_features:
        raise ValueError(f"label mapping must choose distinct outputs in [0, {linear.out_features})")
    new = nn.Linear(linear.in_features, len(mapping), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    index = torch.tensor(mapping, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight.index_select(0, index))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.index_select(0, index))
    return new

"""A stage's trained network as saved in result/: weights plus what is needed to rebuild it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import ImageClassifier, build_backbone

PRODUCT_FILE = "model.pt"


def save_product(directory: Path, model: ImageClassifier, *, arch: str, classes, res: int) -> None:
    torch.save({"model": {k: v.cpu() for k, v in model.backbone.state_dict().items()},
                "arch": arch, "classes": list(classes), "res": res}, directory / PRODUCT_FILE)


def load_product(directory: Path) -> tuple[ImageClassifier, dict]:
    """Rebuild the classifier from a result directory (plain torchvision architecture + weights)."""
    blob = torch.load(directory / PRODUCT_FILE, map_location="cpu", weights_only=True)
    backbone = build_backbone(blob["arch"], len(blob["classes"]), blob["res"], weights=None)
    backbone.load_state_dict(blob["model"])
    return ImageClassifier(backbone), blob

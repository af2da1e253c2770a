"""Which files count as images in an ImageFolder tree (light module: the config check imports it)."""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def has_an_image(root: Path) -> bool:
    """Stop at the first image: enough to reject an empty tree in milliseconds, even for ImageNet."""
    for class_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for _, _, files in os.walk(class_dir, followlinks=True):
            if any(is_image(f) for f in files):
                return True
    return False

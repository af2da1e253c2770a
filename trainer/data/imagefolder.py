"""ImageFolder trees (`<root>/<class>/<image>`): scanning, seeded validation splits, reading.

Class indices follow torchvision's ImageFolder convention (sorted folder names),
so an Imagenette or ImageNet tree maps wnids to the usual indices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..image_files import IMAGE_SUFFIXES, is_image


class DataError(ValueError):
    """A user-facing data problem; str(e) is one line."""


@dataclass(frozen=True)
class ImageList:
    """Image paths with their labels and the class names they index into."""
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "ImageList":
        return ImageList(tuple(self.paths[i] for i in idx), tuple(self.labels[i] for i in idx), self.classes)


EMPTY_CLASSES = ("error", "skip")


def scan_image_folder(root: str | Path, classes: tuple[str, ...] | None = None, empty: str = "error") -> ImageList:
    """List the images of an ImageFolder tree.

    With `classes` given (a validation tree evaluated against a trained model),
    labels index into that list and a folder it lacks is an error. Otherwise the
    classes are the tree's folders, and a folder without images is an error
    (torchvision's ImageFolder refuses it too: the head would get a class that
    never occurs) or, with `empty="skip"`, left out.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    own_classes = classes is None  # a training tree: its folders are the classes
    classes = tuple(found) if classes is None else tuple(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"{root}: classes {unknown[:3]} are not among the {len(classes)} classes the model was trained on")
    paths, labels = [], []
    for name in found:
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            for f in sorted(files):
                if is_image(f):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(index[name])
    if not paths:
        raise DataError(f"{root}: no images found in its {len(found)} class folders "
                        f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    present = set(labels)
    empties = [c for c in found if index[c] not in present] if own_classes else []
    if empties and empty == "skip":
        kept = tuple(c for c in classes if c not in empties)
        relabel = {index[c]: i for i, c in enumerate(kept)}
        return ImageList(tuple(paths), tuple(relabel[l] for l in labels), kept)
    if empties:
        more = f" (and {len(empties) - 1} more)" if len(empties) > 1 else ""
        raise DataError(f"{root / empties[0]}: an empty class folder{more}, no {', '.join(IMAGE_SUFFIXES)} images; "
                        f"remove it, or data.empty_classes=skip leaves it out")
    return ImageList(tuple(paths), tuple(labels), classes)


def split_per_class(images: ImageList, val_fraction: float, seed: int) -> tuple[ImageList, ImageList]:
    """A seeded split that takes `val_fraction` of every class (at least one image) for validation."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    train_idx, val_idx = [], []
    for c in range(len(images.classes)):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            continue
        members = rng.permutation(members)
        n_val = max(1, int(round(val_fraction * len(members)))) if len(members) > 1 else 0
        val_idx += members[:n_val].tolist()
        train_idx += members[n_val:].tolist()
    return images.subset(sorted(train_idx)), images.subset(sorted(val_idx))


def limit_per_class(images: ImageList, per_class: int | None, seed: int) -> ImageList:
    """At most `per_class` images of every class, a seeded random choice (None keeps all).

    For small protocols (a few hundred images per class of a large set): the same `seed` gives the same
    subset, and a larger `per_class` keeps every image a smaller one kept.
    """
    if per_class is None:
        return images
    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    keep = []
    for c in range(len(images.classes)):
        keep += rng.permutation(np.flatnonzero(labels == c))[:per_class].tolist()
    return images.subset(sorted(keep))


class ImageListDataset:
    """Indexable (image, label, index) records for FFCV's writer; decodes lazily with PIL."""

    def __init__(self, images: ImageList):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        with Image.open(self.images.paths[i]) as im:
            rgb = np.asarray(im.convert("RGB"))
        return rgb, self.images.labels[i], i

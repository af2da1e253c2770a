"""ImageFolder trees (`<root>/<class>/<image>`): scanning, seeded validation splits, reading.

Class indices follow torchvision's ImageFolder convention (sorted folder names),
so an Imagenette or ImageNet tree maps wnids to the usual indices.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

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


_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit greyscale modes (PNG, TIFF)


def decode_rgb(path: str | Path) -> np.ndarray:
    """The image at `path` as an (H, W, 3) uint8 RGB array, whatever its real format and colour mode.

    Pillow picks the decoder from the file's content, not its name (a PNG under a .jpg name decodes as a
    PNG), and `convert("RGB")` handles CMYK, greyscale, palette and alpha. Two things it does not do:
    EXIF orientation (applied here, so that a photo stored sideways is written upright), and 16-bit
    greyscale (modes I;16 and I), which it clips at 255, turning almost every pixel white: those keep
    their top 8 bits instead. `load()` decodes the whole file, so a truncated one fails here, not later.
    """
    with Image.open(path) as im:
        im.load()
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a damaged EXIF block: the pixels decoded, keep them as stored
            pass
        if im.mode in _SIXTEEN_BIT:
            grey = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        return np.asarray(im.convert("RGB"))


def decode_error(path: str | Path) -> str | None:
    """Why `path` cannot be decoded (one line), or None when it can."""
    try:
        decode_rgb(path)
    except Exception as e:  # noqa: BLE001  (Pillow raises OSError, SyntaxError, ValueError, struct.error...)
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def bad_image_message(path: str, error: str) -> str:
    return (f"{path}: cannot decode this image ({error}); remove or replace it, "
            f"or data.bad_images=skip leaves such files out")


def find_bad_images(paths, num_workers: int, progress: bool = True) -> list[dict]:
    """[{"path", "error"}] of the files among `paths` that cannot be decoded: a full decode of every file,
    spread over `num_workers` processes (data.bad_images=skip checks before writing, so that the .beton
    holds exactly the good ones)."""
    paths = list(paths)
    bar = dict(total=len(paths), desc="checking images", disable=not progress, leave=False, dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30)
    if num_workers <= 1 or len(paths) < 2:
        errors = [decode_error(p) for p in tqdm(paths, **bar)]
    else:
        chunk = max(1, min(64, len(paths) // (4 * num_workers)))
        with multiprocessing.Pool(min(num_workers, len(paths))) as pool:
            errors = list(tqdm(pool.imap(decode_error, paths, chunksize=chunk), **bar))
    return [{"path": p, "error": e} for p, e in zip(paths, errors) if e is not None]


def without(images: ImageList, paths) -> ImageList:
    """`images` less the files in `paths`."""
    drop = set(paths)
    return images.subset([i for i, p in enumerate(images.paths) if p not in drop])


# What a record becomes once the write is abandoned (see ImageListDataset): cheap to encode, never published.
_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


class ImageListDataset:
    """Indexable (image, label, index) records for FFCV's writer; decodes lazily with `decode_rgb`.

    FFCV's writer calls this in its worker processes, and an exception there does not reach the caller:
    the worker prints a traceback and dies, and the writer waits for its samples for ever. So a file
    that cannot be decoded is recorded in shared memory instead, every record after it becomes a
    1-pixel placeholder (the write finishes in seconds), and `raise_if_failed`, called by `write_beton`
    before it publishes the file, raises a one-line DataError naming the file.
    """

    def __init__(self, images: ImageList):
        self.images = images
        self.failed = multiprocessing.Value("q", -1)  # index of a record that could not be decoded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.failed.value < 0:
            try:
                return decode_rgb(self.images.paths[i]), self.images.labels[i], i
            except Exception:  # noqa: BLE001  (named, with the reason, by raise_if_failed)
                with self.failed.get_lock():
                    if self.failed.value < 0:
                        self.failed.value = i
        return _PLACEHOLDER, self.images.labels[i], i

    def raise_if_failed(self) -> None:
        i = self.failed.value
        if i >= 0:
            path = self.images.paths[i]
            raise DataError(bad_image_message(path, decode_error(path) or "it could not be read while writing"))

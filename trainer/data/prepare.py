"""Turn the configured dataset into cached train/val .beton files (written once, by one process)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .beton import cache_key, image_field, write_beton
from .imagefolder import DataError, ImageListDataset, limit_per_class, scan_image_folder, split_per_class
from . import synthetic
from .synthetic import SyntheticImages

DEFAULT_SYNTHETIC_CLASSES = 10
_VAL_SEED_OFFSET = 1_000_003  # the synthetic val split is generated from a different seed


@dataclass(frozen=True)
class DataFiles:
    train: Path | None
    val: Path
    classes: tuple[str, ...]
    num_train: int
    num_val: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class _SyntheticRecords:
    """(image, label, index) records of a SyntheticImages split, as FFCV's writer wants them."""

    def __init__(self, images: SyntheticImages):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, label = self.images[i]
        return image, label, i


def _generator_version() -> str:
    """A change to the generator's code must not reuse betons written by the old one."""
    return hashlib.sha1(Path(synthetic.__file__).read_bytes()).hexdigest()[:8]


def _field(d: DictConfig):
    return image_field(d.write_mode, d.max_resolution, d.jpeg_quality, d.compress_probability)


def _writer_settings(d: DictConfig) -> dict:
    return {k: d[k] for k in ("write_mode", "max_resolution", "jpeg_quality", "compress_probability")}


def _materialise(records_fn: Callable[[], object], path: Path, d: DictConfig, log) -> None:
    if path.exists():
        return
    records = records_fn()
    log(f"writing {len(records)} images to {path}")
    write_beton(records, path, _field(d), num_workers=max(1, min(d.num_workers, os.cpu_count() or 1)))


def _write_manifest(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


def prepare_data(d: DictConfig, *, is_writer: bool, barrier: Callable[[], None] = lambda: None,
                 log: Callable[[str], None] = print) -> DataFiles:
    """Write (if missing) and locate the train and validation .beton files for config section `d`.

    Only the process with `is_writer` writes; the others wait at `barrier`.
    """
    beton_dir = Path(d.beton_dir).expanduser()
    if d.name == "synthetic":
        n_cls = d.num_classes or DEFAULT_SYNTHETIC_CLASSES
        spec = dict(kind="synthetic", generator=_generator_version(), classes=n_cls,
                    size=d.synthetic_image_size, seed=d.synthetic_seed,
                    train=d.synthetic_train_size, val=d.synthetic_val_size, **_writer_settings(d))
        key = f"synthetic-{cache_key(**spec)}"

        def train():
            return _SyntheticRecords(SyntheticImages(d.synthetic_train_size, d.synthetic_image_size, n_cls, d.synthetic_seed))

        def val():
            return _SyntheticRecords(SyntheticImages(d.synthetic_val_size, d.synthetic_image_size, n_cls,
                                                     d.synthetic_seed + _VAL_SEED_OFFSET))

        classes_fn = lambda: tuple(SyntheticImages(n_cls, d.synthetic_image_size, n_cls, 0).classes)  # noqa: E731
    else:
        train_dir = str(Path(d.train_dir).expanduser().resolve())
        val_dir = str(Path(d.val_dir).expanduser().resolve()) if d.val_dir else None
        # .get: a run's stored config.yaml from before the key existed, read as it is (benchmarks)
        empty = d.get("empty_classes", "error")
        all_train = scan_image_folder(train_dir, empty=empty)  # fails fast on an empty or odd tree
        spec = dict(kind="imagefolder", train=train_dir, val=val_dir, count=len(all_train),
                    val_fraction=None if val_dir else d.val_fraction,
                    split_seed=None if val_dir else d.split_seed, **_writer_settings(d))
        # Only when set, so that the cache keys of full splits stay those written before these keys existed.
        spec.update({k: d[k] for k in ("train_per_class", "val_per_class") if d[k] is not None})
        if empty != "error":
            spec["empty_classes"] = empty
        key = f"{Path(train_dir).parent.name}-{Path(train_dir).name}-{cache_key(**spec)}"
        if val_dir:
            train_list, val_list = all_train, scan_image_folder(val_dir, classes=all_train.classes)
        else:
            train_list, val_list = split_per_class(all_train, d.val_fraction, d.split_seed)
            if len(val_list) == 0:
                raise DataError(f"{train_dir}: too few images per class to carve a validation split")
        # Seeds apart from the split's, so that a subset never depends on which images the split took.
        train_list = limit_per_class(train_list, d.train_per_class, d.split_seed + 1)
        val_list = limit_per_class(val_list, d.val_per_class, d.split_seed + 2)
        train = lambda: ImageListDataset(train_list)  # noqa: E731
        val = lambda: ImageListDataset(val_list)  # noqa: E731
        classes_fn = lambda: all_train.classes  # noqa: E731

    files = (beton_dir / f"{key}-train.beton", beton_dir / f"{key}-val.beton")
    manifest = beton_dir / f"{key}.json"
    if is_writer and not (manifest.exists() and all(f.exists() for f in files)):
        _materialise(train, files[0], d, log)
        _materialise(val, files[1], d, log)
        from ffcv.reader import Reader
        _write_manifest(manifest, {"classes": list(classes_fn()), "spec": spec,
                                   "num_train": int(Reader(str(files[0])).num_samples),
                                   "num_val": int(Reader(str(files[1])).num_samples)})
    barrier()
    info = json.loads(manifest.read_text())
    return DataFiles(files[0], files[1], tuple(info["classes"]), info["num_train"], info["num_val"])


def prepare_eval_data(d: DictConfig, classes: tuple[str, ...], *, is_writer: bool,
                      barrier: Callable[[], None] = lambda: None, log=print) -> DataFiles:
    """A validation .beton for `d.val_dir`, labelled with the classes a model was trained on."""
    val_dir = str(Path(d.val_dir).expanduser().resolve())
    images = scan_image_folder(val_dir, classes=classes)
    key = f"eval-{Path(val_dir).name}-{cache_key(val=val_dir, count=len(images), classes=classes, **_writer_settings(d))}"
    path = Path(d.beton_dir).expanduser() / f"{key}-val.beton"
    if is_writer:
        _materialise(lambda: ImageListDataset(images), path, d, log)
    barrier()
    return DataFiles(None, path, tuple(classes), 0, len(images))

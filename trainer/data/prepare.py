"""Turn the configured dataset into cached train/val .beton files (written once, by one process)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .beton import cache_key, check_beton, fingerprint, image_field, write_beton
from .imagefolder import (DataError, ImageList, ImageListDataset, find_bad_images, limit_per_class,
                          scan_image_folder, split_per_class, without)
from . import synthetic
from .synthetic import SyntheticImages

DEFAULT_SYNTHETIC_CLASSES = 10
_VAL_SEED_OFFSET = 1_000_003  # the synthetic val split is generated from a different seed
_POLL_S = 2.0  # how often a waiting process looks for the writer's manifest


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


def _workers(d: DictConfig) -> int:
    return max(1, min(d.num_workers, os.cpu_count() or 1))


def _materialise(records_fn: Callable[[], object], path: Path, d: DictConfig, log) -> None:
    if path.exists():
        return
    records = records_fn()
    log(f"writing {len(records)} images to {path}")
    write_beton(records, path, _field(d), num_workers=_workers(d), log=log)


def _write_manifest(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_betons(parts: dict[Path, Callable[[], object]], known: dict, d: DictConfig, log) -> dict:
    """Write the missing betons of `parts`; their fingerprints for the manifest, by file name.

    A beton that was already there keeps the fingerprint `known` (its old manifest) recorded when it was
    written (the check after the wait still compares it with that); one that a manifest from before
    fingerprints does not describe is fingerprinted as it is.
    """
    betons = {}
    for path, records_fn in parts.items():
        if path.exists() and path.name in known:
            betons[path.name] = known[path.name]
            continue
        _materialise(records_fn, path, d, log)
        betons[path.name] = fingerprint(path)
    return betons


def _wait_minutes(d: DictConfig) -> float:
    return float(d.get("wait_minutes", 720))  # .get: a stored config from before the key (benchmarks)


def _start_writing(manifest: Path, files, is_writer: bool, broadcast) -> tuple[bool, dict]:
    """Whether the writer (re)writes this cache now, the same answer on every process (one quick broadcast),
    and the fingerprints the old manifest recorded. The writer removes an incomplete cache's manifest before
    it answers, so that a waiting process can never take the old manifest for the new one."""
    known = {}
    writes = is_writer and not (manifest.exists() and all(f.exists() for f in files))
    if writes:
        known = (_read_manifest(manifest) or {}).get("betons", {})
        manifest.unlink(missing_ok=True)
    return bool(broadcast(writes)), known


def _wait_for(manifest: Path, d: DictConfig, say) -> None:
    """Wait, outside any collective, until the writer has published `manifest` (the last file it writes).

    The other processes of a job sit here while the main one writes the betons: hours for ImageNet, longer
    than any collective's timeout. They poll the file and say every few minutes that they wait."""
    minutes = _wait_minutes(d)
    start = time.monotonic()
    said = -1
    while not manifest.exists():
        waited = (time.monotonic() - start) / 60
        if waited > minutes:
            raise DataError(f"{manifest}: the main process did not finish writing the betons within "
                            f"data.wait_minutes={minutes:g}; raise it, or write them first with a one-process job "
                            f"(any stage=dense run of the same data settings)")
        if int(waited // 10) > said:  # at once, then every 10 minutes
            said = int(waited // 10)
            say(f"waiting for the main process to write {manifest.name.removesuffix('.json')} "
                f"({waited:.0f} of at most {minutes:g} min, data.wait_minutes)")
        time.sleep(_POLL_S)


def _read_checked(manifest: Path, files) -> dict:
    """The manifest, after checking every beton of `files` against it (each process, once the writer is done)."""
    info = _read_manifest(manifest)
    if info is None:
        raise DataError(f"{manifest}: missing or unreadable; delete it and the next run writes it again")
    for f in files:
        check_beton(f, info.get("betons", {}).get(f.name))
    return info


def _leave_out_bad_images(lists: dict[str, ImageList], d: DictConfig, progress: bool,
                          log) -> tuple[dict[str, ImageList], list[dict]]:
    """data.bad_images=skip: decode every listed file first, and leave out those that cannot be decoded.

    Called after the split and the per-class subsets, so that neither depends on which files are bad."""
    paths = [p for images in lists.values() for p in images.paths]
    bad = find_bad_images(paths, _workers(d), progress)
    gone = {b["path"] for b in bad}
    kept = {name: without(images, gone) for name, images in lists.items()}
    counts = ", ".join(f"{len(images) - len(kept[name])} {name}" for name, images in lists.items())
    if bad:
        log(f"data.bad_images=skip: left out {len(bad)} of {len(paths)} images that cannot be decoded ({counts}), "
            f"e.g. {bad[0]['path']} ({bad[0]['error']}); the manifest lists them all")
    else:
        log(f"data.bad_images=skip: all {len(paths)} images decode")
    for name, images in kept.items():
        if len(images) == 0:
            raise DataError(f"data.bad_images=skip: none of the {len(lists[name])} {name} images can be decoded "
                            f"(e.g. {bad[0]['path']}: {bad[0]['error']})")
    return kept, bad


def prepare_data(d: DictConfig, *, is_writer: bool, broadcast: Callable[[bool], bool] = lambda x: x,
                 log: Callable[[str], None] = print, progress: bool = True,
                 say_waiting: Callable[[str], None] = print) -> DataFiles:
    """Write (if missing) and locate the train and validation .beton files for config section `d`.

    Only the process with `is_writer` writes; `broadcast` (the engine's, a collective) tells the others
    whether it does, and those then poll for its manifest (`_wait_for`, saying so with `say_waiting`) rather
    than wait in a collective. Every process then checks the files against their manifest (a damaged cache
    file fails in one line naming it). `progress`: a bar for data.bad_images=skip's check of every image.
    """
    lists = None  # ImageFolder: the ImageLists the betons are written from
    # .get: a run's stored config.yaml from before the key existed, read as it is (benchmarks)
    bad_images = d.get("bad_images", "error")
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
        if bad_images != "error":
            spec["bad_images"] = bad_images
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
        lists = {"train": train_list, "val": val_list}
        train = lambda: ImageListDataset(lists["train"])  # noqa: E731
        val = lambda: ImageListDataset(lists["val"])  # noqa: E731
        classes_fn = lambda: all_train.classes  # noqa: E731

    files = (beton_dir / f"{key}-train.beton", beton_dir / f"{key}-val.beton")
    manifest = beton_dir / f"{key}.json"
    writing, known = _start_writing(manifest, files, is_writer, broadcast)
    if writing and is_writer:
        bad = []
        if lists is not None and bad_images == "skip":
            kept, bad = _leave_out_bad_images(lists, d, progress, log)
            lists.update(kept)
        betons = _write_betons({files[0]: train, files[1]: val}, known, d, log)
        _write_manifest(manifest, {"classes": list(classes_fn()), "spec": spec,
                                   "num_train": betons[files[0].name]["num_samples"],
                                   "num_val": betons[files[1].name]["num_samples"],
                                   "bad_images": bad, "betons": betons})
    elif writing:
        _wait_for(manifest, d, say_waiting)
    info = _read_checked(manifest, files)
    return DataFiles(files[0], files[1], tuple(info["classes"]), info["num_train"], info["num_val"])


def prepare_eval_data(d: DictConfig, classes: tuple[str, ...], *, is_writer: bool,
                      broadcast: Callable[[bool], bool] = lambda x: x, log=print, progress: bool = True,
                      say_waiting: Callable[[str], None] = print) -> DataFiles:
    """A validation .beton for `d.val_dir`, labelled with the classes a model was trained on.

    With its manifest `<key>.json` (the beton's fingerprint and data.bad_images=skip's list), checked by
    every process like prepare_data's; a beton cached before such manifests is used unchecked.
    """
    val_dir = str(Path(d.val_dir).expanduser().resolve())
    images = scan_image_folder(val_dir, classes=classes)
    bad_images = d.get("bad_images", "error")
    spec = dict(val=val_dir, count=len(images), classes=classes, **_writer_settings(d))
    if bad_images != "error":
        spec["bad_images"] = bad_images
    key = f"eval-{Path(val_dir).name}-{cache_key(**spec)}"
    path = Path(d.beton_dir).expanduser() / f"{key}-val.beton"
    manifest = path.with_name(f"{key}.json")
    writing, known = _start_writing(manifest, [path], is_writer, broadcast)
    if writing and is_writer:
        lists, bad = {"val": images}, []
        if bad_images == "skip":
            lists, bad = _leave_out_bad_images(lists, d, progress, log)
        betons = _write_betons({path: lambda: ImageListDataset(lists["val"])}, known, d, log)
        _write_manifest(manifest, {"classes": list(classes), "spec": spec, "num_val": betons[path.name]["num_samples"],
                                   "bad_images": bad, "betons": betons})
    elif writing:
        _wait_for(manifest, d, say_waiting)
    info = _read_manifest(manifest)
    if info is None and path.exists():  # written before eval betons had manifests
        return DataFiles(None, path, tuple(classes), 0, len(images))
    info = _read_checked(manifest, [path])
    return DataFiles(None, path, tuple(classes), 0, info["num_val"])

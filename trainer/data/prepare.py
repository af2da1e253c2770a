"""Turn the configured dataset into cached train/val .beton files (written once, by one process)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
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
    """Processes that write the betons and check images: data.write_workers, or every core this process may
    run on. The affinity mask, not os.cpu_count(): SLURM binds a task to its cpus_per_task cores through it,
    and the node's other cores belong to other tasks. (data.num_workers is the loader's thread count, and
    no loader runs while the cache is written.)"""
    n = d.get("write_workers")  # .get: a stored config.yaml from before the key (benchmarks)
    if n:
        return int(n)
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(cores))


def _materialise(records_fn: Callable[[], object], path: Path, d: DictConfig, log, progress: bool) -> None:
    if path.exists():
        return
    records = records_fn()
    workers = _workers(d)
    log(f"writing {len(records)} images to {path} ({workers} processes)")
    write_beton(records, path, _field(d), num_workers=workers, log=log, bar=progress)


def _write_manifest(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_betons(parts: dict[Path, Callable[[], object]], known: dict, d: DictConfig, log, progress: bool) -> dict:
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
        _materialise(records_fn, path, d, log, progress)
        betons[path.name] = fingerprint(path)
    return betons


def _wait_minutes(d: DictConfig) -> float:
    return float(d.get("wait_minutes", 720))  # .get: a stored config from before the key (benchmarks)


@dataclass
class _Plan:
    """What the writer works out before the cache is looked at: its key, and how to write it.

    Only the writer makes one (for an ImageFolder that lists the whole tree); the other processes learn the
    key from its broadcast (`_agree`) and read the rest from the manifest once it is written."""
    key: str
    spec: dict  # what the key is made of, kept in the manifest
    parts: dict[str, Callable[[], object]]  # "train" / "val": the records of that beton, made when written
    classes: Callable[[], tuple[str, ...]]
    lists: dict[str, ImageList] | None = None  # ImageFolder: the lists `parts` read (data.bad_images=skip edits)
    extra: dict = field(default_factory=dict)  # sent to every process with the key


def _planned(plan: Callable[[], _Plan]) -> _Plan | DataError:
    """The writer's plan, or the DataError that stopped it (sent to the others instead of the key)."""
    try:
        return plan()
    except DataError as e:
        return e


def _paths(beton_dir: Path, key: str, parts) -> tuple[Path, dict[str, Path]]:
    return beton_dir / f"{key}.json", {part: beton_dir / f"{key}-{part}.beton" for part in parts}


def _agree(planned: _Plan | DataError | None, plan_alone: Callable[[], _Plan | DataError], beton_dir: Path,
           parts: tuple[str, ...], is_writer: bool, broadcast) -> tuple[dict, dict]:
    """The writer's answer, the same on every process after one quick broadcast: the cache key, whether the
    writer (re)writes that cache now, and its plan's `extra`; with, on the writer, the fingerprints the old
    manifest recorded.

    Only the writer has a plan (`planned`: made by it alone, so the others never list the tree); the writer
    removes an incomplete cache's manifest before it answers, so that a waiting process can never take the
    old manifest for the new one. A plan that failed (an empty class folder, no such directory) is the
    answer too: every process then stops with the writer's one line instead of waiting for it.

    A non-writer that gets no answer (broadcast None: the default broadcast, one process that only reads an
    existing cache, such as an export check) is alone: it makes the plan itself (`plan_alone`) and writes
    nothing. In a job, the engine's broadcast always carries rank 0's answer.
    """
    answer, known = None, {}
    if is_writer and isinstance(planned, DataError):
        answer = {"error": str(planned)}
    elif is_writer:
        manifest, files = _paths(beton_dir, planned.key, parts)
        writes = not (manifest.exists() and all(f.exists() for f in files.values()))
        if writes:
            known = (_read_manifest(manifest) or {}).get("betons", {})
            manifest.unlink(missing_ok=True)
        answer = {"key": planned.key, "writes": writes, **planned.extra}
    answer = broadcast(answer)
    if answer is None and not is_writer:
        planned = plan_alone()
        answer = {"error": str(planned)} if isinstance(planned, DataError) else \
            {"key": planned.key, "writes": False, **planned.extra}
    if not isinstance(answer, dict):
        raise RuntimeError("prepare_data: no answer from the writing process; `broadcast` must give every "
                           "process the object of the process with is_writer (rank 0)")
    if "error" in answer:
        raise planned if isinstance(planned, DataError) else DataError(answer["error"])
    return answer, known


def _write_cache(plan: _Plan, manifest: Path, files: dict[str, Path], known: dict, d: DictConfig, log,
                 progress: bool) -> None:
    """Write the missing betons of `plan` and then, last, their manifest (what the others wait for)."""
    bad = []
    if plan.lists is not None and d.get("bad_images", "error") == "skip":
        kept, bad = _leave_out_bad_images(plan.lists, d, progress, log)
        plan.lists.update(kept)
    betons = _write_betons({files[part]: records for part, records in plan.parts.items()}, known, d, log, progress)
    counts = {f"num_{part}": betons[files[part].name]["num_samples"] for part in plan.parts}
    _write_manifest(manifest, {"classes": list(plan.classes()), "spec": plan.spec, **counts, "bad_images": bad,
                               "betons": betons})


def _settle(plan: Callable[[], _Plan | DataError], beton_dir: Path, parts: tuple[str, ...], d: DictConfig,
            is_writer: bool, broadcast, log, progress: bool, say_waiting) -> tuple[dict, Path, dict[str, Path]]:
    """Agree on the cache, write it (the writer) or wait for it (the others, when it is being written).
    `plan`: the writer's plan, made by the writer only (and by a process alone, see `_agree`)."""
    planned = plan() if is_writer else None
    answer, known = _agree(planned, plan, beton_dir, parts, is_writer, broadcast)
    manifest, files = _paths(beton_dir, answer["key"], parts)
    if answer["writes"] and is_writer:
        _write_cache(planned, manifest, files, known, d, log, progress)
    elif answer["writes"]:
        _wait_for(manifest, d, say_waiting)
    return answer, manifest, files


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


def _synthetic_plan(d: DictConfig) -> _Plan:
    n_cls = d.num_classes or DEFAULT_SYNTHETIC_CLASSES
    spec = dict(kind="synthetic", generator=_generator_version(), classes=n_cls,
                size=d.synthetic_image_size, seed=d.synthetic_seed,
                train=d.synthetic_train_size, val=d.synthetic_val_size, **_writer_settings(d))

    def train():
        return _SyntheticRecords(SyntheticImages(d.synthetic_train_size, d.synthetic_image_size, n_cls,
                                                 d.synthetic_seed))

    def val():
        return _SyntheticRecords(SyntheticImages(d.synthetic_val_size, d.synthetic_image_size, n_cls,
                                                 d.synthetic_seed + _VAL_SEED_OFFSET))

    return _Plan(f"synthetic-{cache_key(**spec)}", spec, {"train": train, "val": val},
                 lambda: tuple(SyntheticImages(n_cls, d.synthetic_image_size, n_cls, 0).classes))


def _listed(root: str, log, **kwargs) -> ImageList:
    """scan_image_folder, saying how long it took: on a shared filesystem listing ImageNet takes a while."""
    start = time.monotonic()
    images = scan_image_folder(root, **kwargs)
    log(f"listed {len(images)} images in {len(images.classes)} classes under {root} "
        f"({time.monotonic() - start:.1f} s)")
    return images


def _imagefolder_plan(d: DictConfig, log) -> _Plan:
    """List the tree (every file: its count enters the key), then split and subset it as the betons hold it."""
    train_dir = str(Path(d.train_dir).expanduser().resolve())
    val_dir = str(Path(d.val_dir).expanduser().resolve()) if d.val_dir else None
    # .get: a run's stored config.yaml from before the key existed, read as it is (benchmarks)
    empty, bad_images = d.get("empty_classes", "error"), d.get("bad_images", "error")
    all_train = _listed(train_dir, log, empty=empty)  # fails fast on an empty or odd tree
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
        train_list, val_list = all_train, _listed(val_dir, log, classes=all_train.classes)
    else:
        train_list, val_list = split_per_class(all_train, d.val_fraction, d.split_seed)
        if len(val_list) == 0:
            raise DataError(f"{train_dir}: too few images per class to carve a validation split")
    # Seeds apart from the split's, so that a subset never depends on which images the split took.
    lists = {"train": limit_per_class(train_list, d.train_per_class, d.split_seed + 1),
             "val": limit_per_class(val_list, d.val_per_class, d.split_seed + 2)}
    return _Plan(key, spec, {"train": lambda: ImageListDataset(lists["train"]),
                             "val": lambda: ImageListDataset(lists["val"])},
                 lambda: all_train.classes, lists)


def prepare_data(d: DictConfig, *, is_writer: bool, broadcast: Callable[[object], object] = lambda x: x,
                 log: Callable[[str], None] = print, progress: bool = True,
                 say_waiting: Callable[[str], None] = print) -> DataFiles:
    """Write (if missing) and locate the train and validation .beton files for config section `d`.

    Only the process with `is_writer` lists the ImageFolder tree and writes. `broadcast` (the engine's
    broadcast_object, a collective; the default suits one process) gives every process the writer's
    answer: the cache key and whether it writes now. The others then poll for its manifest (`_wait_for`,
    saying so with `say_waiting`) rather than wait in a collective, and read the classes and counts from
    it. Every process checks the files against their manifest (a damaged cache file fails in one line
    naming it). `progress`: bars for data.bad_images=skip's check of every image and for the writes, where a
    terminal shows them; the writes otherwise log images/s and the time left every 30 s.
    `is_writer=False` with the default broadcast is a process alone that reads an existing cache: it lists
    the tree itself to find the key, and writes nothing.
    """
    beton_dir = Path(d.beton_dir).expanduser()

    def plan():
        return _planned(lambda: _synthetic_plan(d) if d.name == "synthetic" else _imagefolder_plan(d, log))

    _, manifest, files = _settle(plan, beton_dir, ("train", "val"), d, is_writer, broadcast, log, progress,
                                 say_waiting)
    info = _read_checked(manifest, files.values())
    return DataFiles(files["train"], files["val"], tuple(info["classes"]), info["num_train"], info["num_val"])


def _eval_plan(d: DictConfig, classes: tuple[str, ...], log) -> _Plan:
    val_dir = str(Path(d.val_dir).expanduser().resolve())
    images = _listed(val_dir, log, classes=classes)
    bad_images = d.get("bad_images", "error")
    spec = dict(val=val_dir, count=len(images), classes=classes, **_writer_settings(d))
    if bad_images != "error":
        spec["bad_images"] = bad_images
    lists = {"val": images}
    # count: the record count of an eval beton cached before such betons had manifests
    return _Plan(f"eval-{Path(val_dir).name}-{cache_key(**spec)}", spec,
                 {"val": lambda: ImageListDataset(lists["val"])}, lambda: tuple(classes), lists,
                 extra={"count": len(images)})


def prepare_eval_data(d: DictConfig, classes: tuple[str, ...], *, is_writer: bool,
                      broadcast: Callable[[object], object] = lambda x: x, log=print, progress: bool = True,
                      say_waiting: Callable[[str], None] = print) -> DataFiles:
    """A validation .beton for `d.val_dir`, labelled with the classes a model was trained on.

    With its manifest `<key>.json` (the beton's fingerprint and data.bad_images=skip's list), agreed on,
    written and checked like prepare_data's: only the writer lists `d.val_dir`. A beton cached before such
    manifests is used unchecked.
    """
    def plan():
        return _planned(lambda: _eval_plan(d, tuple(classes), log))

    answer, manifest, files = _settle(plan, Path(d.beton_dir).expanduser(), ("val",), d, is_writer, broadcast, log,
                                      progress, say_waiting)
    path = files["val"]
    if _read_manifest(manifest) is None and path.exists():  # written before eval betons had manifests
        return DataFiles(None, path, tuple(classes), 0, answer["count"])
    info = _read_checked(manifest, [path])
    return DataFiles(None, path, tuple(classes), 0, info["num_val"])

"""Writing FFCV .beton files: atomically, once, cached under a key of everything that shapes them.

A beton is first written to a temporary file next to it (`.<name>.<pid>.tmp`) that its writer holds an
`flock` on; the lock dies with the writer, so the next write removes the temporary files whose lock it can
take (writers that were killed) and leaves alone those of live writers, on this host or another one sharing
the directory. `fingerprint` and `check_beton` catch a cached file damaged afterwards.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.types import HeaderType
from ffcv.writer import DatasetWriter

from .imagefolder import DataError
from .write_progress import ffcv_progress

TEMP_GLOB = ".*.beton.*.tmp"  # the temporary files of write_beton, of every beton in a directory


def cache_key(**parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def image_field(write_mode: str, max_resolution: int | None, jpeg_quality: int,
                compress_probability: float) -> RGBImageField:
    return RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                         jpeg_quality=jpeg_quality, compress_probability=compress_probability)


# The descriptors of the temporary files this process holds locked. A forked child (FFCV's writer workers,
# the image check's pool) closes its copies: the lock then lives exactly as long as the writer itself, and a
# worker left running after its writer was killed does not keep a dead write's file alive.
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _create_locked(tmp: Path) -> int:
    """Create `tmp` and hold an exclusive flock on it until `_release`."""
    for _ in range(200):
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a cleaner took it between our open and lock, to remove it: try again
            os.close(fd)
            time.sleep(0.01)
            continue
        except OSError:  # a file system without flock (Lustre without -o flock): write unlocked, nothing cleans it
            return fd
        if _same_file(fd, tmp):  # not unlinked by a cleaner before we locked it
            os.ftruncate(fd, 0)
            _held.add(fd)
            return fd
        os.close(fd)
    raise DataError(f"{tmp}: another writer keeps this temporary file locked")


def _release(fd: int) -> None:
    _held.discard(fd)
    os.close(fd)


def remove_stale_temps(directory: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temporary betons in `directory` left by killed writers: those whose lock is free."""
    removed = []
    for tmp in sorted(Path(directory).glob(TEMP_GLOB)):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:  # gone already, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, tmp):
                size = os.fstat(fd).st_size
                tmp.unlink()
                removed.append(tmp)
                if log:
                    log(f"removed {tmp} ({size / 2**20:.1f} MiB), the temporary file of a writer that was killed")
        except OSError:  # BlockingIOError: a live writer holds it; another error: no flock here, cannot tell
            pass
        finally:
            os.close(fd)
    return removed


def _publish(tmp: Path, path: Path) -> None:
    """Give `tmp` its final name unless a concurrent writer (another job sharing the cache) got there first:
    its file is then the one every process reads, and the manifests of both writers describe it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        os.replace(tmp, path)


def write_beton(dataset, path: Path, field: RGBImageField, num_workers: int,
                log: Callable[[str], None] | None = None, bar: bool = False) -> Path:
    """Write (image, label, index) records to `path` with `num_workers` processes; a crash never leaves a half
    file there.

    Progress goes to `log`: images written, images/s and the time left, every 30 s and at the end
    (write_progress.py); `bar`: a tqdm bar instead of the periodic lines where stderr is a terminal.

    The `index` field is the record's position in the file: it lets tests check
    which samples each rank saw, and evaluation count every sample exactly once.
    A dataset with a `raise_if_failed()` method is asked, after the write and before the file is
    published, whether a record could not be read (see ImageListDataset).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, log)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = _create_locked(tmp)  # FFCV opens the file by name: the lock, on the inode, stays ours
    try:
        writer = DatasetWriter(str(tmp), {"image": field, "label": IntField(), "index": IntField()},
                               num_workers=num_workers)
        with ffcv_progress(log, label=f"{path.name}: ", bar=bar):
            writer.from_indexed_dataset(dataset, chunksize=64)
        getattr(dataset, "raise_if_failed", lambda: None)()
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _release(fd)
    return path


def _index_digest(path: Path, ranges) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for start, end in ranges:
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(left, 1 << 22))
                if not block:
                    break
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def fingerprint(path: Path) -> dict:
    """Size, sample count and a checksum of the header and index of the .beton at `path`.

    FFCV's layout: the header (HeaderType: version, counts, `alloc_table_ptr`) at offset 0, the field
    descriptors, the metadata table (one entry per sample: label, image size, mode and a pointer into the
    data), then the pages of image data, and from `alloc_table_ptr` to the end of the file the allocation
    table (where each sample's bytes lie). Damage to the header or either table is what makes the reader
    fail or read far outside the file; the image data is left out of the checksum, so that it stays cheap
    (about 80 MB for ImageNet's 1.28 M images) while the size catches a truncated file.
    """
    r = Reader(str(path))
    size = path.stat().st_size
    ranges = [[0, HeaderType.itemsize + r.field_descriptors.nbytes + r.metadata.nbytes],
              [int(r.header["alloc_table_ptr"]), size]]
    return {"size": size, "num_samples": int(r.num_samples), "index_ranges": ranges,
            "index_blake2b": _index_digest(path, ranges)}


def check_beton(path: Path, expected: dict | None) -> None:
    """Raise a one-line DataError when `path` differs from its manifest entry `expected` (None: a manifest
    written before entries existed, accepted as it is)."""
    if not expected:
        return
    fix = "delete it and the next run writes it again"
    if not path.exists():
        raise DataError(f"{path}: missing, though its manifest lists it; the next run writes it again")
    size = path.stat().st_size
    if size != expected["size"]:
        raise DataError(f"{path}: damaged .beton ({size} bytes, the manifest records {expected['size']}); {fix}")
    if _index_digest(path, expected["index_ranges"]) != expected["index_blake2b"]:
        raise DataError(f"{path}: damaged .beton (the checksum of its header and index differs from the "
                        f"manifest's); {fix}")

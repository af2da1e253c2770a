"""Atomic checkpoints with fallbacks: a crash mid-write never costs the last good one.

`last.pt` is replaced by rename only after the new file is fully written and
synced; the previous `last.pt` is kept as `prev-<step>.pt` (the newest `keep`
of them), so a damaged `last.pt` still leaves something to resume from. A write that fails (a full disk) removes its
temporary file and leaves every existing checkpoint as it was.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import torch

from .run_dir import checkpoint_candidates

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def cpu_copy(obj):
    """`obj` with every tensor (in nested dicts, lists, tuples) copied to the CPU: a published file that holds
    GPU tensors would not load where that GPU is missing, without map_location."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())  # a state dict stays an OrderedDict
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class DiskFull(OSError):
    """No room for a checkpoint; str(e) is one line."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


class _RememberedWriteError(io.FileIO):
    """A file that keeps the OSError of its failed write: torch.save reports a full disk only as an opaque
    RuntimeError ("unexpected pos ...")."""
    error: OSError | None = None

    def write(self, data):
        try:
            return super().write(data)
        except OSError as e:
            self.error = e
            raise


def _write_synced(obj, path: Path) -> Path:
    """Write `obj` fully to a temporary file next to `path` and return it (nothing at `path` changes yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = _RememberedWriteError(tmp, "wb")
    try:
        with io.BufferedWriter(raw) as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = raw.error or (e if isinstance(e, OSError) else None)
        if cause is not None and cause.errno in _NO_SPACE:
            free = shutil.disk_usage(path.parent).free / 2**20
            raise DiskFull(f"the disk is full: writing {path} failed ({os.strerror(cause.errno)}; {free:.1f} MiB "
                           f"free on {path.parent} after removing the partial file); the checkpoints already "
                           f"there are kept. Free some space and relaunch the same command to resume") from None
        raise
    return tmp


def atomic_save(obj, path: Path) -> None:
    os.replace(_write_synced(obj, path), path)


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 2):
        self.dir, self.keep = Path(directory), keep

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def save(self, state: dict, step: int) -> Path:
        # Write first, then rotate: a kill during the (long) write leaves last.pt in place, and
        # between the two renames the newest state is still found among prev-*.pt.
        tmp = _write_synced(state, self.last)
        if self.keep > 0 and self.last.exists():
            os.replace(self.last, self.dir / f"prev-{step:09d}.pt")
            for old in sorted(self.dir.glob("prev-*.pt"))[:-self.keep]:
                old.unlink(missing_ok=True)
        os.replace(tmp, self.last)
        return self.last

    def newest(self) -> Path | None:
        """The checkpoint a resume tries first, if any."""
        return next(iter(self.candidates()), None)

    def candidates(self) -> list[Path]:
        """Newest first: last.pt, then the kept older ones."""
        return checkpoint_candidates(self.dir)

    def load_latest(self, log=print) -> dict | None:
        """The newest checkpoint that loads; damaged ones are reported and skipped."""
        for path in self.candidates():
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
                state["_path"] = str(path)
                return state
            except Exception as e:  # noqa: BLE001 - any unreadable file means: try the next one
                log(f"checkpoint {path} is unreadable ({type(e).__name__}); trying an older one")
        return None

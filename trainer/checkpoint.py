"""Atomic checkpoints with fallbacks: a crash mid-write never costs the last good one.

`last.pt` is replaced by rename only after the new file is fully written and
synced; the previous `last.pt` is kept as `prev-<step>.pt` (the newest `keep`
of them), so a damaged `last.pt` still leaves something to resume from.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .run_dir import checkpoint_candidates


def _write_synced(obj, path: Path) -> Path:
    """Write `obj` fully to a temporary file next to `path` and return it (nothing at `path` changes yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
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

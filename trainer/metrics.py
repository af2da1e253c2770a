"""Metric helpers: top-k counts and the append-only metrics.jsonl log."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k predictions, for each k (on device, no sync)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(labels.view(-1, 1))
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


class MetricsLog:
    """One JSON object per line, written by rank 0. Records past a resumed checkpoint are dropped.

    With `tensorboard_dir`, every numeric field is also a TensorBoard scalar `<kind>/<field>` at the
    record's step (logger=tensorboard); metrics.jsonl stays the record the reports read.
    """

    def __init__(self, path: Path, enabled: bool = True, tensorboard_dir: Path | None = None):
        self.path, self.enabled = Path(path), enabled
        self.tensorboard_dir = tensorboard_dir
        self._writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            kind = record.get("kind", "record")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("kind", "step"):
                    self._writer.add_scalar(f"{kind}/{key}", value, global_step=record.get("step", 0))
            if kind == "epoch":
                self._writer.flush()

    def truncate_after(self, step: int) -> None:
        """Forget what was logged after `step`: those steps are about to be trained again.

        Called once when a stage starts or resumes; it also opens the TensorBoard writer, which hides
        the events a resumed run is about to log again (`purge_step`).
        """
        if not self.enabled:
            return
        if self.tensorboard_dir is not None and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is only imported when asked for

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=step + 1 if step else None)
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

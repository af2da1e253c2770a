"""The run directory contract (see DESIGN.md):

    runs/<run>/config.yaml                the resolved config, written once
    runs/<run>/.lock                      flock(2) of the process running the run (trainer/run_lock.py)
    runs/<run>/<stage>/checkpoints/       last.pt and a few older ones
    runs/<run>/<stage>/metrics.jsonl      one record per logged step / epoch
    runs/<run>/<stage>/result/            the stage's product; its existence means "done"
    runs/<run>/report/                    report.md and its plots (stage=report; the end of stage=all)
    runs/<sweep>/sweep.json               a sweep: its points (runs/<sweep>/<point>/) and shared dense runs
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


SWEEP_FILE = "sweep.json"
# DeepSpeed checkpoints (trainer/engines/ds_checkpoint.py): a tag directory per save, trusted once complete.
DEEPSPEED_COMPLETE = "complete.json"
DEEPSPEED_UNIVERSAL = "-universal"


def checkpoint_candidates(directory: Path) -> list[Path]:
    """DDP checkpoints (trainer/checkpoint.py), the order a resume tries them: last.pt, then the kept
    older prev-<step>.pt, newest first."""
    last = directory / "last.pt"
    return ([last] if last.exists() else []) + sorted(directory.glob("prev-*.pt"), reverse=True)


def complete_deepspeed_tags(directory: Path) -> list[Path]:
    """Complete DeepSpeed checkpoint tags (step-<N>/ with complete.json), newest first."""
    if not directory.is_dir():
        return []
    tags = [d for d in directory.glob("step-*") if d.is_dir() and not d.name.endswith(DEEPSPEED_UNIVERSAL)
            and (d / DEEPSPEED_COMPLETE).exists()]
    return sorted(tags, key=lambda d: d.name, reverse=True)


class RunDir:
    def __init__(self, runs_dir: str | Path, run: str):
        self.root = Path(runs_dir).expanduser() / run
        self.name = run

    def stage(self, stage: str) -> Path:
        return self.root / stage

    def result(self, stage: str) -> Path:
        return self.stage(stage) / "result"

    def newest_checkpoint(self, stage: str) -> Path | None:
        """The checkpoint the stage would resume from (None: it starts afresh). Torch-free: stage=status asks."""
        directory = self.stage(stage) / "checkpoints"
        return next(iter(checkpoint_candidates(directory) + complete_deepspeed_tags(directory)), None)

    def finished_note(self, stages: list[str], outcome: str) -> str:
        """What a relaunch of a finished run says instead of doing anything."""
        return (f"run '{self.name}' is finished ({', '.join(stages)} done); {outcome}. Results: {self.root}; "
                f"stage=eval evaluates again, resume=never starts a new run")

    def is_done(self, stage: str) -> bool:
        return (self.result(stage) / "summary.json").exists()

    def nothing_to_do(self, stage: str, stages: list[str]) -> bool:
        """Whether `stage=<stage>`, planned as `stages`, has nothing left to run (eval always runs again)."""
        return stage != "eval" and all(self.is_done(s) for s in stages)

    def summary(self, stage: str) -> dict:
        return json.loads((self.result(stage) / "summary.json").read_text())

    def write_config(self, cfg: DictConfig) -> None:
        """Write config.yaml the first time only: it records how the run was created."""
        path = self.root / "config.yaml"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_text(path, OmegaConf.to_yaml(cfg))

    def publish(self, stage: str, write_files) -> Path:
        """Fill a fresh directory with `write_files(dir)`, then rename it to result/ in one step."""
        final = self.result(stage)
        tmp = final.with_name(f".result.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_files(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final


def timestamped(name: str) -> str:
    """The name of a fresh run for resume=never: <name>-<YYYYmmdd-HHMMSS>."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    _atomic_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")

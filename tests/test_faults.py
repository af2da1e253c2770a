"""Faults injected for real: a run that diverges to NaN (more of issue 18's cases to come here)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_main

pytestmark = pytest.mark.slow


def test_a_nan_run_stops_publishes_nothing_and_keeps_its_last_good_checkpoint(tmp_path, beton_dir):
    """dense.lr=1e12: the first step's update is finite but huge, the second step's loss is not. The stage stops
    there in one line, writes no result, ends metrics.jsonl at the last finite step and keeps the step-1
    checkpoint as it was."""
    code, out, err = run_main(["stage=dense", "run=r", f"runs_dir={tmp_path}", f"data.beton_dir={beton_dir}", *TINY,
                               "dense.lr=1e12", "dense.epochs=1", "log.every_steps=1", "checkpoint.every_steps=1"])
    stage = tmp_path / "r" / "dense"
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]), err  # one line (after the beton bars)
    assert "dense: the loss is not finite" in err and "from step 2" in err and "dense.lr" in err, err
    assert not (stage / "result").exists()
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    checkpoints = sorted(p.name for p in (stage / "checkpoints").glob("*.pt"))
    assert str(stage / "checkpoints") in err and checkpoints, (err, checkpoints)
    state = torch.load(stage / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 1
    weights = [v for v in state["engine"]["model"].values() if torch.is_floating_point(v)]
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights)

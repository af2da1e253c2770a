"""Faults injected for real: a run that diverges to NaN, a second launch of a running run, a disk that fills
up during a checkpoint write. (The data faults, bad images and damaged betons: test_faults_data.py.)"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import DENSE_ARGS, LAUNCH, REPO, TINY, child_env, launch, run_main

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


def _wait_for_lock_holder(lock, proc, timeout: float = 120) -> None:
    """Until `proc` has taken the run lock (the file names its pid once it holds the flock)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(lock.read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    pytest.fail(f"the first launch never took the run lock (exit code {proc.poll()})")


def test_a_second_launch_of_a_running_run_fails_at_once_and_the_first_ends_as_if_alone(tmp_path, beton_dir,
                                                                                      dense_run):
    """The first launch is stopped (SIGSTOP) right after it takes the lock, so the second one meets a running
    run on any machine; it fails in one line naming the holder, and the first, continued, trains the same
    network as `dense_run`, the same command launched alone. A SIGKILLed holder leaves no stale lock."""
    args = [f"runs_dir={tmp_path}", f"data.beton_dir={beton_dir}", *DENSE_ARGS, "stage=dense", "dense.epochs=2"]
    lock = tmp_path / "r" / ".lock"
    first = subprocess.Popen([sys.executable, str(LAUNCH), *args], cwd=REPO, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock_holder(lock, first)
        first.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        second = launch(args, timeout=120)
        seconds = time.monotonic() - started
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    print(f"the second launch failed after {seconds:.1f} s")  # reported, not asserted (docs/testing.md)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr and "already running" in second.stderr
    assert first.returncode == 0, err[-3000:]
    alone, shared = dense_run / "r/dense/result", tmp_path / "r/dense/result"
    assert json.loads((shared / "summary.json").read_text())["top1"] == json.loads(
        (alone / "summary.json").read_text())["top1"]
    a, b = (torch.load(d / "model.pt", map_location="cpu", weights_only=False) for d in (alone, shared))
    a, b = (x.get("model", x) for x in (a, b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    killed = subprocess.Popen([sys.executable, str(LAUNCH), *[a for a in args if a != "run=r"], "run=k"], cwd=REPO,
                              env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_lock_holder(tmp_path / "k" / ".lock", killed)
    killed.kill()
    killed.wait()
    from trainer.run_lock import run_lock
    with run_lock(tmp_path / "k"):  # the kernel dropped the dead holder's lock
        pass


def test_a_disk_that_fills_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, beton_dir):
    """runs_dir on a tmpfs with room for one checkpoint and a half: the step-1 checkpoint is written, the step-2
    one runs out of space. The stage stops in one line that says the disk is full, no partial file is left
    and the step-1 checkpoint still loads."""
    from trainer.config import load_config
    from trainer.models import build_backbone

    args = ["stage=dense", "run=r", f"data.beton_dir={beton_dir}", *TINY, "dense.epochs=1", "log.every_steps=1",
            "checkpoint.every_steps=1"]
    cfg = load_config(args)
    backbone = build_backbone(cfg.model.name, 10, cfg.data.res)
    checkpoint_bytes = 2 * 4 * sum(p.numel() for p in backbone.parameters())  # fp32 weights + SGD momentum
    runs = tmp_path / "small_disk"
    runs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.5 * checkpoint_bytes)}", "tmpfs", str(runs)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        code, out, err = run_main([*args, f"runs_dir={runs}"])
        stage = runs / "r" / "dense"
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: the disk is full"), err[-3000:]
        assert "Free some space and relaunch" in err and str(stage / "checkpoints") in err
        assert not (stage / "result").exists()
        assert sorted(p.name for p in (stage / "checkpoints").iterdir()) == ["last.pt"]  # no partial file left
        state = torch.load(stage / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        assert state["step"] == 1
    finally:
        subprocess.run(["umount", str(runs)], check=True)

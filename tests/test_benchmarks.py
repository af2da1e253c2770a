"""benchmarks/gpu_check.py, the one command a GPU machine runs first: its CPU smoke mode runs the whole
pipeline and every measurement at toy sizes, and without a GPU the CUDA mode says so and exits 0."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, child_env

pytestmark = pytest.mark.slow

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def _gpu_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU_CHECK), "--threads", "1", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_runs_the_pipeline_and_every_measurement_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = _gpu_check("--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["gpu"] is None and report["device"] == "cpu"
    pipeline = report["pipeline"]
    assert list(pipeline) == ["dense", "pass", "vpns", "zero2"]  # ddp_nccl: CUDA only
    assert list(pipeline["pass"]["stages"]) == ["search", "finetune", "eval"]
    trained = [c for r in pipeline.values() for stage, c in r["stages"].items() if stage != "eval"]
    assert len(trained) == 6 and all(c["losses_finite"] and c["logged_losses"] > 0 for c in trained), pipeline
    steps = report["steps"]
    assert list(steps["results"]) == ["dense", "pass", "vpns", "finetune"]
    assert all(r["images_per_second"] > 0 for r in steps["results"].values())
    assert set(steps["ratios"]) == {"pass_step_over_dense_step", "vpns_substep_over_dense_step",
                                    "finetune_images_per_second_over_dense"}
    networks = report["speedup"]["networks"]
    assert list(networks) == ["dense", "l1@0.5/r8", "l1@0.3/r8"]
    assert [round(n["flops_ratio"], 1) for n in networks.values()] == [1.0, 0.5, 0.3]
    assert "pipeline" in done.stdout and "pruned resnet18 inference" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the CUDA mode would run for real")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = _gpu_check("--out", str(out), timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("no GPU here"), done.stdout + done.stderr[-2000:]
    assert json.loads(out.read_text())["gpu"] is None

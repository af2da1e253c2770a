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


DATA_SCALE = REPO / "benchmarks" / "data_scale.py"


def test_data_scale_measures_every_phase_and_only_rank_0_lists_the_tree(tmp_path):
    """benchmarks/data_scale.py at toy size (2,000 images in 10 classes, FFCV uncompiled, 2 timed batches):
    every phase runs and reports, and of the two processes preparing the data only rank 0 lists the tree
    (1 listing of the root + 1 per class folder); rank 1 reads the writer's result."""
    out = tmp_path / "data_scale.json"
    done = subprocess.run([sys.executable, str(DATA_SCALE), "--sizes", "2000", "--classes", "10",
                           "--root", str(tmp_path / "scale"), "--batch-size", "32", "--warmup", "1", "--batches", "2",
                           "--repeats", "1", "--scan-repeats", "1", "--write-repeats", "1", "--no-jit",
                           "--out", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert (result["scan"]["images"], result["scan"]["listings"]) == (2000, 11)
    prepare = result["prepare"]
    assert prepare["tree_listings_per_rank"] == [11, 0] and prepare["images_written"] == 2000
    writer, other = prepare["ranks"]
    assert (other["num_train"], other["num_val"], other["classes"]) == (writer["num_train"], writer["num_val"], 10)
    assert other["writes"] == [] and [w["images"] for w in writer["writes"]] == [1800, 200]
    assert prepare["write_images_per_second"] > 0 and prepare["beton_bytes"] > 0
    assert result["load"]["images_per_second"] > 0 and result["load"]["runs"]
    assert "-train.beton: written 1800/1800 images in" in done.stdout  # the write's progress line
    assert "listings r0/r1" in done.stdout

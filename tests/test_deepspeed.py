"""engine=deepspeed (ZeRO-1/2/3) on 2 CPU processes over gloo, against DDP with the same seed and batch.

Real DeepSpeed, real torchrun; a tiny resnet18 problem so each run takes a minute or two on 2 cores.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import LAUNCH, REPO, TINY, child_env, copy_dense, launch, read_json, train_dense

pytestmark = pytest.mark.slow

# 4 optimizer steps per epoch (global batch 32, 16 per process), a small validation split.
SMALL = [*TINY, "data.batch_size=32", "data.synthetic_train_size=128", "data.synthetic_val_size=32",
         "log.every_steps=1",
         "search.epochs=1", "search.lr=0.01", "pass.prompt_lr=0.01", "run=r",
         "checkpoint.keep=0"]  # only the newest checkpoint: DeepSpeed shards with optimizer state are large
# Relative loss difference allowed between an engine and DDP after N steps: summation order differs
# (bucketed/partitioned reductions), and the prompt, unused in the VPNs no-prompt step, is stepped by
# DeepSpeed with a zero gradient where DDP skips it (docs/deepspeed.md).
LOSS_TOLERANCE = 0.01


def _args(runs, beton_dir, *extra, method):
    return [f"method={method}", f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *SMALL, *extra]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, beton_dir):
    runs = tmp_path_factory.mktemp("dense")
    return train_dense(runs, _args(runs, beton_dir, method="pass"))


def _losses(run_dir, stage="search"):
    records = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _search(dense_run, tmp_path, beton_dir, method, *engine, processes=2):
    runs = copy_dense(dense_run, tmp_path)
    out = launch(_args(runs, beton_dir, "stage=search", *engine, method=method), torchrun=processes, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "r", out


@pytest.fixture(scope="module")
def ddp_runs(dense_run, tmp_path_factory, beton_dir):
    """The DDP reference run of each method (2 processes, same seed and global batch)."""
    return {m: _search(dense_run, tmp_path_factory.mktemp(f"ddp-{m}"), beton_dir, m)[0] for m in ("pass", "vpns")}


@pytest.fixture(scope="module")
def ddp_losses(ddp_runs):
    return {m: _losses(run) for m, run in ddp_runs.items()}


def _same_hypernetwork_and_prompt(run, reference):
    """PASS: within 4 steps no mask flips, so the loss alone would not show a wrong update; the trained
    hypernetwork and prompt (search.pt, whole again after unwrap) must match DDP's."""
    mine, theirs = (torch.load(r / "search" / "result" / "search.pt", weights_only=False) for r in (run, reference))
    assert mine["hypernet"].keys() == theirs["hypernet"].keys()
    for key, value in theirs["hypernet"].items():
        torch.testing.assert_close(mine["hypernet"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(mine["prompt"], theirs["prompt"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("method", ["pass", "vpns"])
def test_zero_search_matches_ddp(dense_run, ddp_runs, ddp_losses, tmp_path, beton_dir, method, stage):
    run, out = _search(dense_run, tmp_path, beton_dir, method, "engine=deepspeed", f"engine.zero_stage={stage}")
    losses, reference = _losses(run), ddp_losses[method]
    assert sorted(losses) == sorted(reference) and len(losses) >= 4
    for step, loss in losses.items():
        assert abs(loss - reference[step]) <= LOSS_TOLERANCE * abs(reference[step]), (step, loss, reference[step])
    if method == "pass":
        _same_hypernetwork_and_prompt(run, ddp_runs["pass"])
    summary = read_json(run / "search" / "result" / "summary.json")
    digests = summary["mask_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    if stage == 3:
        # every rank holds a shard of the trainable parameters (hypernetwork + prompt, or scores + prompt)
        held = {int(r): (int(h.replace(",", "")), int(t.replace(",", ""))) for r, h, t in re.findall(
            r"ZeRO-3 rank (\d) holds ([\d,]+) of the ([\d,]+) trainable", out.stdout)}
        assert sorted(held) == [0, 1]
        for have, total in held.values():
            assert 0 < have < total and have <= total // 2 + 64
        if method == "pass":
            _zero_to_fp32_loads_into_the_model(run)


def _zero_to_fp32_loads_into_the_model(run):
    """DeepSpeed's zero_to_fp32 consolidation of the ZeRO-3 checkpoint gives the PassSearchNetwork's state dict."""
    from omegaconf import OmegaConf

    from pruning.pass_network import PassSearchNetwork
    from pruning.prompt import PadPrompt
    from trainer.config.schema import root_config
    from trainer.models import build_backbone

    checkpoints = run / "search" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip().startswith("step-")
    out = subprocess.run([sys.executable, "-m", "trainer.engines.export_zero", str(checkpoints), str(run / "fp32.pt")],
                         capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    state = torch.load(run / "fp32.pt", map_location="cpu", weights_only=True)
    cfg = root_config()
    net = PassSearchNetwork(build_backbone("resnet18", 10, 32), res=32, prompt=PadPrompt(32),
                            pass_cfg=OmegaConf.create(OmegaConf.to_container(cfg["pass"])), flops_ratio=0.5)
    result = net.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result


def _kill_after(args, metrics, step, processes=2, timeout=900):
    """Start a torchrun job and SIGKILL its whole process group once `metrics` records `step`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(LAUNCH), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        # torchrun starts its workers in sessions of their own: kill every descendant, then torchrun
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def test_zero2_search_resumes_after_a_kill_with_the_same_losses(dense_run, tmp_path, beton_dir):
    extra = ["stage=search", "search.epochs=2", "checkpoint.every_steps=2", "engine=deepspeed",
             "engine.zero_stage=2"]
    whole, _ = _search(dense_run, tmp_path / "whole", beton_dir, "pass", *extra[1:])
    runs = copy_dense(dense_run, tmp_path / "cut")
    _kill_after(_args(runs, beton_dir, *extra, method="pass"), runs / "r" / "search" / "metrics.jsonl", step=3)
    out = launch(_args(runs, beton_dir, *extra, method="pass"), torchrun=2, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and "step-000000002" in out.stdout, out.stdout[-2000:]
    resumed, reference = _losses(runs / "r"), _losses(whole)
    assert sorted(resumed) == sorted(reference)
    for step in range(3, max(reference) + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step


@pytest.mark.parametrize("engine", [["engine=ddp"], ["engine=deepspeed", "engine.zero_stage=2"]],
                         ids=["ddp", "zero2"])
def test_two_process_checkpoint_resumes_on_one_process(dense_run, tmp_path, beton_dir, engine):
    extra = ["stage=search", "search.epochs=2", *engine]
    runs = copy_dense(dense_run, tmp_path)
    metrics = runs / "r" / "search" / "metrics.jsonl"
    _kill_after(_args(runs, beton_dir, *extra, method="pass"), metrics, step=5)  # after epoch 1's checkpoint
    out = launch(_args(runs, beton_dir, *extra, method="pass"), timeout=1200)    # one process
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and "(step 4)" in out.stdout, out.stdout[-2000:]
    summary = read_json(runs / "r" / "search" / "result" / "summary.json")
    assert summary["world_size"] == 1
    assert max(_losses(runs / "r")) == 8  # epoch 2 trained on the one process


@pytest.mark.parametrize("engine", [["engine=ddp"], ["engine=deepspeed", "engine.zero_stage=2"]],
                         ids=["ddp", "zero2"])
def test_gradient_accumulation_takes_the_same_steps(dense_run, ddp_losses, tmp_path, beton_dir, engine):
    """2 micro-batches of 8 per process and step = one batch of 16 (PASS: the backbone's BatchNorm is frozen)."""
    run, _ = _search(dense_run, tmp_path, beton_dir, "pass", *engine, "engine.grad_accum_steps=2")
    losses, reference = _losses(run), ddp_losses["pass"]
    assert sorted(losses) == sorted(reference)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-4), step

"""engine=deepspeed (ZeRO-2 and ZeRO-3) on 2 CPU processes over gloo, against DDP with the same seed and batch.

Real DeepSpeed, real torchrun; the session's dense resnet18 (tests/conftest.py `dense_run`) pruned on a
small split, so each run takes a minute or less on 2 cores. ZeRO-1 is not run: the project's code
branches on stage 3 only (collectives in every forward, gathering on unwrap, the held-shard report),
and stages 1 and 2 differ only inside DeepSpeed (whether gradients are partitioned as well).
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

from conftest import LAUNCH, REPO, STEP_DELAY_ENV, TINY, child_env, copy_dense, launch, reached_step, read_json

pytestmark = pytest.mark.slow

# 4 optimizer steps per epoch (global batch 32, 16 per process), a small validation split.
SMALL = [*TINY, "data.batch_size=32", "data.synthetic_train_size=128", "data.synthetic_val_size=32",
         "log.every_steps=1",
         "search.epochs=1", "search.lr=0.01", "pass.prompt_lr=0.01", "run=r",
         "checkpoint.keep=0"]  # only the newest checkpoint: DeepSpeed shards with optimizer state are large

# Relative train-loss difference allowed between an engine and DDP at every step.
# VPNs: 1%. DeepSpeed steps the prompt in the step without it (vpns.dual_step) with a zero gradient,
# where DDP skips it (docs/deepspeed.md): Adam's momentum and weight decay still move it.
# PASS: 1e-4. Within 4 steps no mask flips, and the rest is rounding: the per-process computation is
# DDP's, but ZeRO-1/2 keeps the parameters in one flat buffer where, behind PASS's 5-value `u` and
# 1-value `beta`, they start 8 bytes off a 16-byte boundary, and the CPU's matrix-vector products (the
# hypernetwork runs on one sample) round by address modulo 16 bytes; accumulation sums the micro-batch
# gradients in another order. Seen: at most 9e-8 (ZeRO-2), 6e-8 (ZeRO-3, 2 micro-batches).
LOSS_TOLERANCE = {"vpns": 0.01, "pass": 1e-4}

# How far a trained PASS hypernetwork or prompt value may be from DDP's, as a fraction of the sum of
# the learning rates of the steps taken (sum_t lr_t: 0.025 for the 4 cosine steps from 0.01).
# Derivation: an AdamW step moves a value by lr_t * m_t / (sqrt(v_t) + eps) plus the decay lr_t * wd * w.
# By Cauchy-Schwarz |m_t| / sqrt(v_t) <= sqrt(sum_i a_i^2 / b_i) with a_i, b_i the bias-corrected weights
# of gradient i in m_t and v_t: 1.0 at t = 1 and under 1.007 for t <= 4 at betas (0.9, 0.999). So two runs
# can differ by at most ~2 sum_t lr_t per value, whatever their gradients, and a missing, doubled, shifted
# or wrongly reduced step moves most values by a sizeable part of lr_t (a schedule shifted by one step:
# up to 0.4 sum_t lr_t). Rounding-level gradient differences (relative ~1e-7, see
# LOSS_TOLERANCE) move a value by lr_t times their relative size, amplified where gradients of
# successive steps cancel in m_t; seen at most 5.5e-4 sum_t lr_t (ZeRO-2, unaligned parameters) and
# 5.3e-4 (ZeRO-3, 2 micro-batches), 0 for ZeRO-3. 1% leaves 18x of room and still fails a step gone wrong.
# (Setting DeepSpeed's zero_optimization.parameter_alignment makes ZeRO-1/2 bitwise equal to DDP here,
# but changes the checkpoint layout: ZeRO-1/2 checkpoints written without it no longer load.)
ADAM_TOLERANCE = 0.01


def _args(runs, beton_dir, *extra, method):
    return [f"method={method}", f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *SMALL, *extra]


def _losses(run_dir, stage="search"):
    records = [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _search(dense_run, tmp_path, beton_dir, method, *engine, processes=2):
    runs = copy_dense(dense_run, tmp_path)
    out = launch(_args(runs, beton_dir, "stage=search", *engine, method=method), torchrun=processes, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs / "r", out


def _same_losses(losses: dict, reference: dict, rel: float) -> None:
    assert sorted(losses) == sorted(reference) and len(losses) >= 4, (sorted(losses), sorted(reference))
    off = [(step, loss, reference[step]) for step, loss in losses.items()
           if abs(loss - reference[step]) > rel * abs(reference[step])]
    assert not off, f"(step, loss, DDP's loss) beyond a relative {rel}: {off}"


@pytest.fixture(scope="module")
def ddp_runs(dense_run, tmp_path_factory, beton_dir):
    """The DDP reference run of each method (2 processes, same seed and global batch)."""
    return {m: _search(dense_run, tmp_path_factory.mktemp(f"ddp-{m}"), beton_dir, m)[0] for m in ("pass", "vpns")}


@pytest.fixture(scope="module")
def ddp_losses(ddp_runs):
    return {m: _losses(run) for m, run in ddp_runs.items()}


@pytest.fixture(scope="module")
def zero_run(dense_run, tmp_path_factory, beton_dir):
    """zero_run(method, stage, accumulation): (run dir, launcher output) of a 2-process ZeRO search, made on
    first use; the stage-2 PASS run is also the uninterrupted reference of the resume test."""
    made = {}

    def get(method, stage, accumulation=1):
        key = (method, stage, accumulation)
        if key not in made:
            made[key] = _search(dense_run, tmp_path_factory.mktemp(f"zero{stage}-{method}-{accumulation}"), beton_dir,
                                method, "engine=deepspeed", f"engine.zero_stage={stage}",
                                f"engine.grad_accum_steps={accumulation}")
        return made[key]
    return get


def _lr_sum(group_lr: float) -> float:
    """sum_t lr_t over the steps of SMALL's search, for a parameter group of peak `group_lr`."""
    from trainer.config import load_config
    from trainer.optim import lr_factor
    schedule = load_config(["method=pass", *SMALL]).search
    steps = schedule.epochs * 4  # 128 images, global batch 32
    return group_lr * sum(lr_factor(step, schedule, 4) for step in range(steps))


def _same_hypernetwork_and_prompt(run, reference):
    """PASS: within 4 steps no mask flips, so the loss alone would not show a wrong update; the trained
    hypernetwork and prompt (search.pt, whole again after unwrap) must match DDP's (see ADAM_TOLERANCE)."""
    from trainer.config import load_config
    cfg = load_config(["method=pass", *SMALL])
    mine, theirs = (torch.load(r / "search" / "result" / "search.pt", weights_only=False) for r in (run, reference))
    assert mine["hypernet"].keys() == theirs["hypernet"].keys()
    pairs = {**{f"hypernet.{k}": (mine["hypernet"][k], v, cfg.search.lr) for k, v in theirs["hypernet"].items()},
             "prompt": (mine["prompt"], theirs["prompt"], cfg["pass"].prompt_lr)}
    # the largest difference of every tensor, in units of sum_t lr_t of its parameter group
    off = {k: (a - b).abs().max().item() / _lr_sum(lr) for k, (a, b, lr) in pairs.items()}
    print("largest difference from DDP in units of sum_t lr_t:",
          {k: f"{v:.1e}" for k, v in sorted(off.items(), key=lambda kv: -kv[1])[:5]})
    assert max(off.values()) <= ADAM_TOLERANCE, {k: v for k, v in off.items() if v > ADAM_TOLERANCE}


# (method, ZeRO stage, gradient accumulation steps). The PASS ZeRO-3 run also accumulates 2 micro-batches
# of 8 per process per step (its BatchNorm is frozen, so that is the same step as one batch of 16): the
# DeepSpeed side of test_gradient_accumulation_takes_the_same_steps.
@pytest.mark.parametrize("method,stage,accumulation", [("pass", 2, 1), ("pass", 3, 2), ("vpns", 2, 1), ("vpns", 3, 1)],
                         ids=["pass-2", "pass-3-accum2", "vpns-2", "vpns-3"])
def test_zero_search_matches_ddp(zero_run, ddp_runs, ddp_losses, method, stage, accumulation):
    run, out = zero_run(method, stage, accumulation)
    _same_losses(_losses(run), ddp_losses[method], LOSS_TOLERANCE[method])
    if method == "pass":
        _same_hypernetwork_and_prompt(run, ddp_runs["pass"])
    summary = read_json(run / "search" / "result" / "summary.json")
    digests = summary["mask_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    if stage == 3:
        # every rank holds a shard of the trainable parameters (hypernetwork + prompt, or scores + prompt)
        held = {int(r): (int(h.replace(",", "")), int(t.replace(",", ""))) for r, h, t in re.findall(
            r"ZeRO-3 rank (\d) holds ([\d,]+) of the ([\d,]+) trainable", out.stdout)}
        assert sorted(held) == [0, 1], out.stdout[-2000:]
        for have, total in held.values():
            assert 0 < have < total and have <= total // 2 + 64, held
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
    fp32 = run.parent.parent / "fp32.pt"  # outside the run: the shared run stays as the search left it
    out = subprocess.run([sys.executable, "-m", "trainer.engines.export_zero", str(checkpoints), str(fp32)],
                         capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    state = torch.load(fp32, map_location="cpu", weights_only=True)
    cfg = root_config()
    net = PassSearchNetwork(build_backbone("resnet18", 10, 32), res=32, prompt=PadPrompt(32),
                            pass_cfg=OmegaConf.create(OmegaConf.to_container(cfg["pass"])), flops_ratio=0.5)
    result = net.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result


def _kill_after(args, metrics, step, processes=2, timeout=900, delay=0.0):
    """Start a torchrun job and SIGKILL its whole process group once `metrics` records `step`. With `delay`,
    every step sleeps that long after it is logged (conftest.STEP_DELAY_ENV), so the kill lands before the next."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(LAUNCH), *args]
    env = child_env(**{STEP_DELAY_ENV: str(delay)}) if delay else child_env()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if reached_step(metrics, step):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        # torchrun starts its workers in sessions of their own: kill every descendant, then torchrun
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def test_zero2_search_resumes_after_a_kill_with_the_same_losses(dense_run, zero_run, tmp_path, beton_dir):
    """Killed mid-epoch after step 3 (checkpoint at step 2), resumed on 2 processes: the remaining steps
    give the uninterrupted ZeRO-2 run's losses (test_zero_search_matches_ddp[pass-2]'s run)."""
    whole, _ = zero_run("pass", 2)
    extra = ["stage=search", "checkpoint.every_steps=2", "engine=deepspeed", "engine.zero_stage=2"]
    runs = copy_dense(dense_run, tmp_path)
    _kill_after(_args(runs, beton_dir, *extra, method="pass"), runs / "r" / "search" / "metrics.jsonl", step=3,
                delay=1.0)  # 1 s after step 3, before step 4 and its epoch-end checkpoint
    out = launch(_args(runs, beton_dir, *extra, method="pass"), torchrun=2, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and "step-000000002" in out.stdout, out.stdout[-2000:]
    resumed, reference = _losses(runs / "r"), _losses(whole)
    assert sorted(resumed) == sorted(reference), (sorted(resumed), sorted(reference))
    for step in range(3, max(reference) + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), (step, resumed[step], reference[step])


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


def test_gradient_accumulation_takes_the_same_steps(dense_run, ddp_losses, tmp_path, beton_dir):
    """DDP: 2 micro-batches of 8 per process and step = one batch of 16 (PASS: the backbone's BatchNorm is
    frozen). DeepSpeed's accumulation: test_zero_search_matches_ddp[pass-3-accum2]."""
    run, _ = _search(dense_run, tmp_path, beton_dir, "pass", "engine=ddp", "engine.grad_accum_steps=2")
    _same_losses(_losses(run), ddp_losses["pass"], LOSS_TOLERANCE["pass"])

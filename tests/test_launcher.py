"""The launcher's cluster side without SLURM: sweep expansion, job chains, cluster config, the stop-at-a-step
path of a preemption signal, local sweeps and status. tests/test_slurm.py runs the same against real SLURM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (LAUNCH, REPO, STEP_DELAY_ENV, TINY, child_env, copy_dense, launch, launch_here, pass_args,
                      reached_step, read_json, run_main)
from slurm.submit import job_groups
from slurm.sweep import expand, point_name, split_axes
from trainer.config import ConfigError, load_config


def test_sweep_axes_are_the_comma_separated_values():
    fixed, axes = split_axes(["method=pass,l1", "pruning.flops_ratio=0.3,0.5", "seed=1", "cluster.setup=[a,b]"])
    assert fixed == ["seed=1", "cluster.setup=[a,b]"]
    assert axes == [("method", ["pass", "l1"]), ("pruning.flops_ratio", ["0.3", "0.5"])]
    assert point_name([("method", "pass"), ("pruning.flops_ratio", "0.3")]) == "method-pass_flops_ratio-0.3"
    assert point_name([("model.weights", "/w/a b.pt")]) == "weights--w-a-b.pt"


@pytest.mark.parametrize("tokens, shared", [
    (["method=pass,l1", "pruning.flops_ratio=0.3,0.5"], {"dense": 4}),  # what pruning does: one dense network
    (["model=resnet18,vit_tiny", "method=pass,vpns"], {"dense_model-resnet18": 2, "dense_model-vit_tiny": 2}),
    (["method=pass,dense"], {"dense": 1}),  # a method=dense point is a dense run itself
    (["method=pass,l1", "model.weights=IMAGENET1K_V1"], {}),  # given weights: no dense stage at all
    (["method=pass,l1", "stage=search"], {}),  # only stage=all plans a dense stage
])
def test_stage_all_sweep_points_share_a_dense_run_per_dense_setting(tmp_path, tokens, shared):
    root, _, points, listing, dense = expand([*tokens, f"runs_dir={tmp_path}", "run=sw"])
    assert {d.run: d.stage for d in dense} == {name: "dense" for name in shared}
    for name, count in shared.items():
        users = [p for p in points if p.dense_run == str(root.resolve() / name)]
        assert len(users) == count and all(p.stage == "all" for p in users)
        assert [p.get("dense_run") for p in listing].count(name) == count
    assert all(d.method.name == "dense" and d.runs_dir == str(root) for d in dense)


@pytest.mark.parametrize("tokens, message", [
    (["method=pass"], "at least one key with several values"),
    (["method=pass,pass"], "distinct"),
    (["cluster.nodes=1,2"], "cannot be swept"),
    (["stage=search,finetune"], "cannot be swept"),
])
def test_bad_sweeps_are_refused(tokens, message):
    with pytest.raises(ConfigError, match=message):
        split_axes(tokens)


def test_eval_rides_with_the_job_before_it():
    assert job_groups(["dense", "search", "finetune", "eval"]) == [["dense"], ["search"], ["finetune", "eval"]]
    assert job_groups(["eval"]) == [["eval"]]


def test_where_a_run_runs_is_not_part_of_what_it_is(tmp_path):
    base = load_config([f"runs_dir={tmp_path}"])
    on_cluster = load_config([f"runs_dir={tmp_path}", "cluster=slurm", "cluster.partition=gpu",
                              "cluster.extra_sbatch.mail-type=END"])
    assert base.run == on_cluster.run  # the same run, resumable from either place
    assert on_cluster.cluster.extra_sbatch == {"mail-type": "END"}
    (tmp_path / base.run).mkdir()
    (tmp_path / base.run / "config.yaml").write_text(
        __import__("omegaconf").OmegaConf.to_yaml(base))  # created locally ...
    resumed = load_config([f"runs_dir={tmp_path}", "cluster=slurm", "cluster.nodes=2"])  # ... continued on SLURM
    assert resumed.cluster.name == "slurm" and resumed.cluster.nodes == 2


def test_cluster_errors_are_one_line(tmp_path):
    # The real command line, with no sbatch on its PATH.
    env = child_env(PATH=os.path.dirname(sys.executable))
    out = launch(["cluster=slurm", f"runs_dir={tmp_path}", *TINY], env=env)
    assert out.returncode == 2 and "needs the SLURM commands" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for argv, message in ((["stage=status", "run=nope", f"runs_dir={tmp_path}"], "no run or sweep 'nope'"),
                          (["stage=status"], "needs run="),
                          (["cluster.nodez=2"], "did you mean 'cluster.nodes'")):
        code, _, err = run_main(argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.slow
def test_stop_signal_checkpoints_at_the_next_step_and_the_run_resumes_exactly(dense_run, pass_run, tmp_path,
                                                                              beton_dir):
    """cluster=debug runs the job object here; SIGUSR2 mid-search stops it at a step boundary with a checkpoint
    of that very step, and a relaunch continues to the uninterrupted run's (pass_run's) result."""
    extra = ["stage=search", "log.every_steps=1", "checkpoint.every_steps=0"]  # no periodic checkpoints at all
    whole = pass_run.runs

    runs = copy_dense(dense_run, tmp_path / "b")
    metrics = runs / "r/search/metrics.jsonl"
    # each step sleeps 0.3 s after it is logged: the signal lands mid-epoch 1 on any machine
    proc = subprocess.Popen([sys.executable, str(LAUNCH), *pass_args(runs, beton_dir, *extra), "cluster=debug"],
                            cwd=REPO, env=child_env(**{STEP_DELAY_ENV: "0.3"}), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not reached_step(metrics, 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "checkpointed at epoch 1" in output, output[-3000:]
    state = read_json(runs / "r/search/job.json")
    assert state["state"] == "failed" and "no requeue handler" in state["reason"], state
    step = state["step"]
    assert 4 <= step < 10  # mid-epoch 1, not at an epoch end
    assert (runs / "r/search/checkpoints/last.pt").exists()

    resumed = launch_here(pass_args(runs, beton_dir, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {step})" in next(line for line in resumed.stdout.splitlines() if "resumed from" in line)
    a, b = read_json(whole / "r/search/result/structure.json"), read_json(runs / "r/search/result/structure.json")
    assert a["groups"] == b["groups"]
    assert read_json(whole / "r/search/result/summary.json")["top1"] == read_json(runs / "r/search/result/summary.json")["top1"]


# One of two processes taking 12 "steps"; rank 1 gets SIGUSR2 at step 5, rank 0 (whose host lags) never does.
VOTE_RANK = """
import os, signal, sys, time
from omegaconf import OmegaConf
from trainer.distributed import DistEnv
from trainer.engines.ddp import DDPEngine
from trainer.preemption import STOP, StopVote
rank, port = int(sys.argv[1]), int(sys.argv[2])
cfg = OmegaConf.create({"device": "cpu", "backend": "gloo", "precision": "fp32", "channels_last": None})
vote, stopped = StopVote(DDPEngine(cfg, DistEnv(rank, 2, rank, "127.0.0.1", port))), None
STOP.arm(grace_s=60)
for step in range(1, 13):
    if rank == 1 and step == 5:
        os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.02 if rank == 0 else 0)
    if vote.poll():
        stopped = step
        break
vote.settle()
STOP.disarm()
print("stopped at", stopped)
"""


def test_the_stop_vote_stops_every_rank_at_the_same_step():
    """The per-step vote does not wait for the other processes (a non-blocking all-reduce read one step later),
    and still stops both processes, over a real gloo group, at the same step, one after the signal."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", VOTE_RANK, str(rank), str(port)], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    out = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [o.strip().splitlines()[-1] for o in out] == ["stopped at 6"] * 2, out


@pytest.mark.slow
def test_local_sweep_runs_every_point_and_reports_them(structured_sweep):
    """conftest.structured_sweep: `-m method=l1,random,uniform stage=all` on the shared dense weights."""
    runs, points = structured_sweep.runs, ("method-l1", "method-random", "method-uniform")
    assert "== point 3/3: method-uniform" in structured_sweep.stdout, structured_sweep.stdout[-2000:]
    for point in points:
        assert (runs / "sw" / point / "search/result/summary.json").exists()
    status = launch(["stage=status", "run=sw", f"runs_dir={runs}"])  # the real command line
    assert status.returncode == 0 and "3 done" in status.stdout, status.stdout + status.stderr
    code, again, err = run_main(structured_sweep.args)
    assert code == 0 and again.count("nothing to do") == 3, again + err

"""The launcher's cluster side without SLURM: sweep expansion, job chains, cluster config, the stop-at-a-step
path of a preemption signal, local sweeps and status. tests/test_slurm.py runs the same against real SLURM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import LAUNCH, REPO, TINY, child_env, copy_dense, launch, read_json, train_dense
from slurm.submit import job_groups
from slurm.sweep import expand, point_name, split_axes
from trainer.config import ConfigError, load_config

SEARCH = ["search.epochs=2", "search.lr=0.01", "pass.prompt_lr=0.01", "log.every_steps=1"]


def _args(runs, beton_dir, *extra):
    return ["method=pass", "run=r", f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *TINY, *SEARCH, *extra]


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
    env = child_env(PATH=os.path.dirname(sys.executable))  # no sbatch on this PATH
    out = launch(["cluster=slurm", f"runs_dir={tmp_path}", *TINY], env=env)
    assert out.returncode == 2 and "needs the SLURM commands" in out.stderr and "Traceback" not in out.stderr
    out = launch(["stage=status", "run=nope", f"runs_dir={tmp_path}"])
    assert out.returncode == 2 and "no run or sweep 'nope'" in out.stderr, out.stderr
    out = launch(["stage=status"])
    assert out.returncode == 2 and "needs run=" in out.stderr
    out = launch(["cluster.nodez=2"])
    assert out.returncode == 2 and "did you mean 'cluster.nodes'" in out.stderr


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, beton_dir):
    runs = tmp_path_factory.mktemp("dense")
    return train_dense(runs, _args(runs, beton_dir))


@pytest.mark.slow
def test_stop_signal_checkpoints_at_the_next_step_and_the_run_resumes_exactly(dense_run, tmp_path, beton_dir):
    """cluster=debug runs the job object here; SIGUSR2 mid-search stops it at a step boundary with a checkpoint
    of that very step, and a relaunch continues to the uninterrupted run's result."""
    extra = ["stage=search", "search.epochs=3", "checkpoint.every_steps=0"]  # no periodic checkpoints at all
    whole = copy_dense(dense_run, tmp_path / "a")
    assert launch(_args(whole, beton_dir, *extra)).returncode == 0

    runs = copy_dense(dense_run, tmp_path / "b")
    metrics = runs / "r/search/metrics.jsonl"
    proc = subprocess.Popen([sys.executable, str(LAUNCH), *_args(runs, beton_dir, *extra), "cluster=debug"],
                            cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and any(
            json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines() if line.strip())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "checkpointed at epoch 1" in output, output[-3000:]
    state = read_json(runs / "r/search/job.json")
    assert state["state"] == "failed" and "no requeue handler" in state["reason"], state
    step = state["step"]
    assert 4 <= step < 10  # mid-epoch 1, not at an epoch end
    assert (runs / "r/search/checkpoints/last.pt").exists()

    resumed = launch(_args(runs, beton_dir, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {step})" in next(line for line in resumed.stdout.splitlines() if "resumed from" in line)
    a, b = read_json(whole / "r/search/result/structure.json"), read_json(runs / "r/search/result/structure.json")
    assert a["groups"] == b["groups"]
    assert read_json(whole / "r/search/result/summary.json")["top1"] == read_json(runs / "r/search/result/summary.json")["top1"]


@pytest.mark.slow
def test_local_sweep_runs_every_point_and_reports_them(dense_run, tmp_path, beton_dir):
    runs = tmp_path / "runs"
    weights = dense_run / "r/dense/result/model.pt"
    args = ["-m", "method=l1,random", "stage=search", "run=sw", f"runs_dir={runs}", f"model.weights={weights}",
            f"data.beton_dir={beton_dir}", *TINY, *SEARCH]
    out = launch(args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== point 2/2: method-random" in out.stdout
    for point in ("method-l1", "method-random"):
        assert (runs / "sw" / point / "search/result/summary.json").exists()
    status = launch(["stage=status", "run=sw", f"runs_dir={runs}"])
    assert status.returncode == 0 and "2 done" in status.stdout, status.stdout + status.stderr
    again = launch(args)
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 2, again.stdout

"""The launcher against a real single-node SLURM (tests/slurm_cluster.py starts it): jobs, requeues, chains,
arrays, srun DDP and relaunches. Each test submits through `python slurm/launch.py cluster=slurm ...` and
watches the run directory the jobs write, the way a user would."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DENSE_ARGS, PASS_SEARCH, STEP_DELAY_ENV, STEP_DELAY_FRESH_ONLY_ENV, TINY, copy_dense, launch, pass_args, read_json, reached_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SEARCH = [*PASS_SEARCH, "log.every_steps=1"]
# One CPU per job, so the 2-core test node runs two jobs at once; no GPUs.
CLUSTER = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.cpus_per_task=1", "cluster.timeout_min=30",
           "cluster.signal_delay_s=60"]


def _args(runs, beton_dir, *extra):
    return pass_args(runs, beton_dir, "log.every_steps=1", *extra)


def _submit(cluster, args, step_delay: float = 0, fresh_only: bool = False, **job_env: str) -> subprocess.CompletedProcess:
    """Submit through the real command line. `step_delay`: seconds every training step of the jobs sleeps,
    so that a signal, a cancel or a time limit lands mid-run however fast the machine is; `fresh_only`: only
    in a job that starts from scratch (a resumed one runs at full speed); `job_env`: more variables for the
    jobs (sbatch exports the submitting environment)."""
    env = {**cluster.env, **job_env}
    if step_delay:
        env[STEP_DELAY_ENV] = str(step_delay)
    if fresh_only:
        env = {**env, STEP_DELAY_FRESH_ONLY_ENV: "1"}
    out = launch([*CLUSTER, *args], env=env, timeout=120)  # the test's own cluster.* keys win
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def _jobs(run_root: Path) -> list[dict]:
    path = run_root / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _logs(run_root: Path, job_id: str) -> str:
    """Everything the job's tasks printed (submitit writes <job>_<task>_log.out/.err)."""
    folder = run_root / "submitit" if (run_root / "submitit").exists() else run_root.parent / "submitit"
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{job_id}_*_log.*")))


def _wait(cluster, predicate, what: str, run_root: Path, timeout: float = 600):
    """Poll until `predicate()`; on timeout fail with the queue and the run's job logs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    queue = subprocess.run(["squeue", "-t", "all"], env=cluster.env, capture_output=True, text=True).stdout
    logs = "\n".join(f"--- job {j['job_id']}\n{_logs(run_root, j['job_id'])[-3000:]}" for j in _jobs(run_root))
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\nsqueue:\n{queue}\n{logs}")


def _done(run_root: Path, stage: str):
    return lambda: (run_root / stage / "result" / "summary.json").exists()


def _state(run_root: Path, stage: str) -> dict:
    path = run_root / stage / "job.json"
    return read_json(path) if path.exists() else {}


def _reached_step(run_root: Path, stage: str, step: int):
    return lambda: reached_step(run_root / stage / "metrics.jsonl", step)


def _status(cluster, runs: Path, name: str) -> str:
    out = launch(["stage=status", f"run={name}", f"runs_dir={runs}"], env=cluster.env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _same_search(a: Path, b: Path) -> None:
    """Two search results are the same decision: structure, accuracy and per-rank mask digests."""
    assert read_json(a / "search/result/structure.json")["groups"] == read_json(b / "search/result/structure.json")["groups"]
    sa, sb = read_json(a / "search/result/summary.json"), read_json(b / "search/result/summary.json")
    assert (sa["top1"], sa["mask_digest_per_rank"]) == (sb["top1"], sb["mask_digest_per_rank"])


def test_search_job_completes_and_a_relaunch_is_a_no_op(slurm_cluster, dense_run, pass_run, tmp_path, beton_dir):
    runs = copy_dense(dense_run, tmp_path)
    run = runs / "r"
    out = _submit(slurm_cluster, _args(runs, beton_dir, "stage=search"))
    assert "search: job" in out.stdout, out.stdout
    _wait(slurm_cluster, _done(run, "search"), "the search job's result", run)
    state = _state(run, "search")
    assert state["state"] == "completed" and state["starts"] == 1, state
    _same_search(pass_run.run, run)  # the same search as here
    assert "search    done" in _status(slurm_cluster, runs, "r")

    again = _submit(slurm_cluster, _args(runs, beton_dir, "stage=search"))
    assert "is finished" in again.stdout and "nothing to submit" in again.stdout, again.stdout
    assert len(_jobs(run)) == 1  # nothing new was submitted


def test_preempted_search_requeues_resumes_and_matches_an_uninterrupted_run(slurm_cluster, dense_run, pass_run,
                                                                            tmp_path, beton_dir):
    """The signals submitit's job._interrupt() sends (SIGTERM, then SIGUSR2). Real preemption, by a job of the
    higher-priority partition (SLURM signals, then requeues by PreemptMode=REQUEUE), is what the two-node
    test preempts (tests/test_slurm_multinode.py). The reference is pass_run's search: the same settings,
    uninterrupted, here."""
    extra = ["stage=search", "checkpoint.every_steps=3"]
    runs = copy_dense(dense_run, tmp_path / "b")
    run = runs / "r"
    _submit(slurm_cluster, _args(runs, beton_dir, *extra), step_delay=0.5)  # 20 steps: >= 10 s of training
    job_id = _jobs(run)[0]["job_id"]
    _wait(slurm_cluster, _reached_step(run, "search", 4), "search step 4", run)  # after the step-3 checkpoint
    for sig in ("TERM", "USR2"):
        subprocess.run(["scancel", f"--signal={sig}", job_id], env=slurm_cluster.env, check=True)
    _wait(slurm_cluster, _done(run, "search"), "the requeued search's result", run)

    state = _state(run, "search")
    assert state["state"] == "completed" and state["starts"] == 2 and state["job_id"] == job_id, state
    requeue = next(h for h in state["history"] if h["state"] == "requeued")
    assert requeue["reason"].startswith("preemption") and requeue["step"] >= 4, state["history"]
    log = _logs(run, job_id)
    assert "for requeue" in log, log[-3000:]
    resumed = next(line for line in log.splitlines() if "resumed from" in line)
    assert f"(step {requeue['step']})" in resumed, resumed  # it continued exactly where it stopped
    _same_search(pass_run.run, run)


def test_time_limit_requeues_until_done_and_a_spent_timeout_count_fails_clearly(slurm_cluster, dense_run, tmp_path,
                                                                                 beton_dir):
    # A 2-minute limit with the signal asked for 30 s before it. slurmctld looks at time limits every 30 s and
    # signals once the limit is within the warning time plus those 30 s: 60 to 90 s into the job (with SLURM's
    # 1-minute minimum the signal came ~22 s in, before the first training step of a job that starts under
    # load, so no start ever made progress). In a job that starts from scratch each of the search's 20 steps
    # sleeps 7 s (STEP_DELAY_ENV): 140 s of training, more than the 120 s limit, so no first job can finish
    # on any machine, however fast, and the signal (at most 90 s in) always lands mid-search, 7 s steps
    # leaving it 30 s to be seen. A resumed job does not sleep (STEP_DELAY_FRESH_ONLY_ENV), so the patient
    # run's second job finishes the search; the strict one fails clearly wherever its signal lands.
    extra = ["stage=search", "checkpoint.every_steps=2", "cluster.timeout_min=2", "cluster.signal_delay_s=30"]
    patient, strict = copy_dense(dense_run, tmp_path / "patient"), copy_dense(dense_run, tmp_path / "strict")
    _submit(slurm_cluster, [*_args(patient, beton_dir, *extra), "cluster.max_timeouts=6"], step_delay=7.0,
            fresh_only=True)
    _submit(slurm_cluster, [*_args(strict, beton_dir, *extra), "cluster.max_timeouts=0"], step_delay=7.0,
            fresh_only=True)

    _wait(slurm_cluster, lambda: _state(strict / "r", "search").get("state") == "failed",
          "the job allowed no timeout to fail", strict / "r", timeout=900)
    failed = _state(strict / "r", "search")
    assert "time limit" in failed["reason"] and "cluster.max_timeouts=0" in failed["reason"], failed
    # stage=status believes SLURM's queue while the job is live there (its process may still be exiting)
    strict_job = failed["job_id"]
    _wait(slurm_cluster, lambda: slurm_cluster.squeue_states([strict_job]).get(strict_job) not in
          ("PENDING", "RUNNING", "COMPLETING"), "SLURM to end the failed job", strict / "r", timeout=120)
    assert "failed" in _status(slurm_cluster, strict, "r")

    _wait(slurm_cluster, _done(patient / "r", "search"), "the time-limited search to finish", patient / "r",
          timeout=1200)
    state = _state(patient / "r", "search")
    assert state["starts"] >= 2, state
    assert any(h["state"] == "requeued" and h["reason"] == "time limit" for h in state["history"]), state["history"]


def test_stage_all_chains_finetune_after_search_and_skips_it_when_search_fails(slurm_cluster, dense_run, tmp_path,
                                                                               beton_dir):
    """Also: a dense job whose loss turns NaN (dense.lr=1e12) is recorded as failed with the reason, once, and
    SLURM does not requeue it."""
    good, bad, nan = copy_dense(dense_run, tmp_path / "good"), copy_dense(dense_run, tmp_path / "bad"), tmp_path / "nan"
    (bad / "r/dense/result/model.pt").write_bytes(b"not a checkpoint")  # the search will fail loading it
    _submit(slurm_cluster, _args(good, beton_dir, "stage=all"))
    _submit(slurm_cluster, _args(bad, beton_dir, "stage=all"))
    _submit(slurm_cluster, [f"runs_dir={nan}", f"data.beton_dir={beton_dir}", *DENSE_ARGS, "stage=dense",
                            "dense.lr=1e12", "dense.epochs=1"])

    search, finetune = _jobs(good / "r")
    assert search["stages"] == ["search"] and finetune["stages"] == ["finetune", "eval"]
    assert finetune["depends_on"] == search["job_id"]
    _wait(slurm_cluster, _done(good / "r", "eval"), "the chained finetune and eval", good / "r")
    searched = next(h["at"] for h in _state(good / "r", "search")["history"] if h["state"] == "completed")
    started = next(h["at"] for h in _state(good / "r", "finetune")["history"] if h["state"] == "running")
    assert started >= searched

    bad_finetune = _jobs(bad / "r")[1]["job_id"]
    _wait(slurm_cluster, lambda: _state(bad / "r", "search").get("state") == "failed", "the search to fail", bad / "r")
    _wait(slurm_cluster, lambda: slurm_cluster.squeue_states([bad_finetune]).get(bad_finetune) not in
          ("PENDING", "RUNNING"), "SLURM to drop the dependent finetune job", bad / "r", timeout=120)
    assert not (bad / "r/finetune/job.json").exists()  # it never started
    status = _status(slurm_cluster, bad, "r")
    search_line = next(line for line in status.splitlines() if line.strip().startswith("search"))
    finetune_line = next(line for line in status.splitlines() if line.strip().startswith("finetune"))
    assert "failed" in search_line and "model.pt" in search_line, status
    assert "not run" in finetune_line and "search did not succeed" in finetune_line, status

    nan_job = _jobs(nan / "r")[0]["job_id"]
    _wait(slurm_cluster, lambda: _state(nan / "r", "dense").get("state") == "failed", "the NaN job to fail", nan / "r")
    _wait(slurm_cluster, lambda: slurm_cluster.squeue_states([nan_job]).get(nan_job) not in
          ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), "SLURM to end the NaN job", nan / "r", timeout=120)
    failed = _state(nan / "r", "dense")
    assert failed["reason"].startswith("NonFiniteLoss: dense: the loss is not finite") and failed["starts"] == 1, failed
    assert slurm_cluster.job(nan_job).get("Restarts") == "0" and not (nan / "r/dense/result").exists()


def test_sweep_of_four_points_is_one_array(slurm_cluster, dense_run, tmp_path, beton_dir):
    weights = dense_run / "r/dense/result/model.pt"
    runs = tmp_path / "runs"
    args = ["-m", "method=pass,l1", "pruning.flops_ratio=0.3,0.6", "stage=search", "run=sw", f"runs_dir={runs}",
            f"model.weights={weights}", f"data.beton_dir={beton_dir}", *TINY, *SEARCH]
    out = _submit(slurm_cluster, args)
    assert "array" in out.stdout and "of 4 task(s)" in out.stdout, out.stdout
    sweep = read_json(runs / "sw/sweep.json")
    names = [p["run"] for p in sweep["points"]]
    assert names == ["method-pass_flops_ratio-0.3", "method-pass_flops_ratio-0.6",
                     "method-l1_flops_ratio-0.3", "method-l1_flops_ratio-0.6"]
    jobs = [_jobs(runs / "sw" / n)[0] for n in names]
    arrays = {j["array"] for j in jobs}
    assert len(arrays) == 1, jobs
    array = arrays.pop()
    assert sorted(j["job_id"] for j in jobs) == [f"{array}_{i}" for i in range(4)]
    for name in names:
        _wait(slurm_cluster, _done(runs / "sw" / name, "search"), f"point {name}", runs / "sw" / name)
    flops = {n: read_json(runs / "sw" / n / "search/result/summary.json")["flops_ratio_achieved"] for n in names}
    assert all(abs(flops[n] - float(n.rsplit("-", 1)[1])) < 0.05 for n in names), flops
    status = _status(slurm_cluster, runs, "sw")
    assert "4 done" in status, status


def test_stage_all_sweep_waits_for_its_shared_dense_job_and_ends_with_a_report(slurm_cluster, tmp_path, beton_dir):
    """A stage=all sweep submits one dense job; the points' first array waits for it (afterok), and the
    last point to finish writes the sweep's report."""
    runs = tmp_path / "runs"
    args = ["-m", "method=l1", "pruning.flops_ratio=0.3,0.6", "run=sw", f"runs_dir={runs}",
            f"data.beton_dir={beton_dir}", *TINY, "dense.epochs=1", "finetune.epochs=1"]
    out = _submit(slurm_cluster, args)
    dense_job = re.search(r"^dense: job (\d+)", out.stdout, re.M).group(1)
    assert f"of 2 task(s) after dense job(s) {dense_job}" in out.stdout, out.stdout
    names = ["flops_ratio-0.3", "flops_ratio-0.6"]
    assert [j["depends_on"] for n in names for j in _jobs(runs / "sw" / n)[:1]] == [dense_job, dense_job]
    report = runs / "sw/report/report.md"
    for name in names:
        _wait(slurm_cluster, _done(runs / "sw" / name, "eval"), f"point {name}", runs / "sw" / name)
    _wait(slurm_cluster, lambda: report.exists() and report.read_text().count("| flops_ratio-") == 2,
          "the sweep report with both points", runs / "sw" / names[-1], timeout=60)
    assert not (runs / "sw" / names[0] / "dense").exists()
    assert (runs / "sw/dense/dense/result/model.pt").exists() and (runs / "sw/report/accuracy_vs_flops.png").exists()


def test_two_tasks_under_srun_match_a_two_process_local_run(slurm_cluster, dense_run, pass_search_2proc, tmp_path,
                                                            beton_dir):
    extra = ["stage=search"]
    local = pass_search_2proc.runs  # the same search under torchrun, here

    runs = copy_dense(dense_run, tmp_path / "srun")
    _submit(slurm_cluster, [*_args(runs, beton_dir, *extra), "cluster.tasks_per_node=2"])
    _wait(slurm_cluster, _done(runs / "r", "search"), "the 2-task search", runs / "r")
    summary = read_json(runs / "r/search/result/summary.json")
    assert summary["world_size"] == 2 and len(summary["mask_digest_per_rank"]) == 2, summary
    assert _state(runs / "r", "search")["tasks"] == 2
    _same_search(local / "r", runs / "r")


def test_relaunching_a_cancelled_run_resumes_it(slurm_cluster, dense_run, tmp_path, beton_dir):
    args = _args(copy_dense(dense_run, tmp_path), beton_dir, "stage=search", "checkpoint.every_steps=2")
    runs, run = tmp_path / "runs", tmp_path / "runs" / "r"
    _submit(slurm_cluster, args, step_delay=1.0)  # 20 steps of >= 1 s: the cancel at step 5 lands mid-run
    first = _jobs(run)[0]["job_id"]
    _wait(slurm_cluster, _reached_step(run, "search", 5), "search step 5", run)
    out = launch(["stage=cancel", "run=r", f"runs_dir={runs}"], env=slurm_cluster.env)
    assert out.returncode == 0 and f"cancelled 1 job(s): {first}" in out.stdout, out.stdout + out.stderr
    _wait(slurm_cluster, lambda: slurm_cluster.squeue_states([first]).get(first) not in ("RUNNING", "COMPLETING"),
          "the cancelled job to end", run, timeout=120)
    assert "cancelled" in _status(slurm_cluster, runs, "r")

    again = _submit(slurm_cluster, args)  # the same command; no delay now
    assert "resumes from" in again.stdout, again.stdout
    second = _jobs(run)[1]["job_id"]
    assert second != first
    _wait(slurm_cluster, _done(run, "search"), "the relaunched search", run)
    assert "resumed from" in _logs(run, second)

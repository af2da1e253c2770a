"""The local single-node SLURM cluster (tests/slurm_cluster.py) behaves as the launcher's tests rely on."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import CRED_EXPIRE_S, SlurmCluster

pytestmark = pytest.mark.slurm

# Waits for USR2, reports when it came, and exits 0 so the job ends COMPLETED rather than TIMEOUT.
TRAP_USR2 = """\
import signal, sys, time
start = time.time()
got = []
signal.signal(signal.SIGUSR2, lambda *_: got.append(time.time() - start))
while not got and time.time() - start < 300:
    time.sleep(0.2)
open(sys.argv[1], "w").write(f"USR2 after {got[0]:.1f}s\\n" if got else "no USR2\\n")
"""


# Appends "start <restart count>" to a log; the first run then logs every USR2/TERM it gets
# until it is killed, a restarted one exits at once.
LOG_SIGNALS = """\
import os, signal, sys, time
log = open(sys.argv[1], "a", buffering=1)
for sig in (signal.SIGUSR2, signal.SIGTERM):
    signal.signal(sig, lambda s, _: log.write(signal.Signals(s).name + "\\n"))
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
log.write(f"start {restart}\\n")
while restart == "0":
    time.sleep(0.2)
"""


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster):
    """The session's cluster, with every job this test left behind cancelled afterwards."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_batch_job_runs(cluster: SlurmCluster, tmp_path):
    out = tmp_path / "hi.out"
    job = cluster.sbatch(f"--output={out}", "--wrap", "echo hi")
    assert cluster.wait_finished([job], timeout=60) == {job: "COMPLETED"}
    assert out.read_text() == "hi\n"


@pytest.mark.slow
def test_usr2_arrives_before_the_time_limit(cluster: SlurmCluster, tmp_path):
    """--signal=USR2@60 reaches job steps (srun, as submitit runs its jobs), not the batch shell;
    B:USR2@60 reaches the batch shell. SLURM may signal up to 60 s early, so both come within
    the first minute of a 2-minute job."""
    script = tmp_path / "trap.py"
    script.write_text(TRAP_USR2)
    step_report, shell_report = tmp_path / "step.txt", tmp_path / "shell.txt"
    step = cluster.sbatch("--signal=USR2@60", "-t", "2", f"--output={tmp_path / 'step.out'}",
                         "--wrap", f"srun {sys.executable} {script} {step_report}")
    shell = cluster.sbatch("--signal=B:USR2@60", "-t", "2", f"--output={tmp_path / 'shell.out'}",
                          "--wrap", f"exec {sys.executable} {script} {shell_report}")
    states = cluster.wait_finished([step, shell], timeout=150)
    assert states == {step: "COMPLETED", shell: "COMPLETED"}, cluster.run("squeue", "-t", "all")
    for report in (step_report, shell_report):
        assert report.read_text().startswith("USR2 after"), report.read_text()


@pytest.mark.slow
def test_requeued_job_runs_again(cluster: SlurmCluster, tmp_path):
    """`scontrol requeue` ends the running job and starts it again: by itself after the
    BeginTime hold of cred_expire+1 s, sooner with release()."""
    starts, out = tmp_path / "starts", tmp_path / "job.out"
    job = cluster.sbatch(f"--output={out}", "--open-mode=append", "--wrap",
                         f"echo ${{SLURM_RESTART_COUNT:-0}} >> {starts}; exec sleep 300")
    delays = []
    for restart, release in ((1, False), (2, True)):
        cluster.wait_for(lambda: count_lines(starts) == restart, 60, f"start {restart} of job {job}")
        requeued = time.monotonic()
        cluster.run("scontrol", "requeue", job)
        if release:
            cluster.release(job)
        cluster.wait_for(lambda: count_lines(starts) == restart + 1, 60, f"job {job} to start again")
        delays.append(time.monotonic() - requeued)
    print(f"requeue-to-restart: {delays[0]:.1f}s on its own, {delays[1]:.1f}s with release()")
    assert starts.read_text().split() == ["0", "1", "2"]
    assert cluster.job(job)["Restarts"] == "2"
    assert CRED_EXPIRE_S <= delays[0] < CRED_EXPIRE_S + 30  # held for BeginTime = requeue + cred_expire + 1
    assert delays[1] < CRED_EXPIRE_S + 1  # release() lifted the hold


@pytest.mark.slow
def test_a_job_in_the_urgent_partition_preempts_and_requeues(cluster: SlurmCluster, tmp_path):
    """With preempt_send_user_signal the preempted job's steps get its --signal and SIGTERM at once,
    in either order (SIGKILL follows KillWait later), and the job is requeued and runs again once
    the node is free."""
    script, log = tmp_path / "log_signals.py", tmp_path / "signals.log"
    script.write_text(LOG_SIGNALS)
    whole_node = f"--cpus-per-task={cluster.cpus}"
    low = cluster.sbatch(whole_node, "--signal=USR2@60", f"--output={tmp_path / 'low.out'}",
                        "--wrap", f"srun {sys.executable} {script} {log}")
    cluster.wait_for(lambda: log.exists() and "start 0" in log.read_text(), 60, f"job {low} to start")
    time.sleep(2)  # a step preempted within a second of its start was seen killed without the SIGTERM
    high = cluster.sbatch(whole_node, "-p", cluster.preempt_partition, f"--output={tmp_path / 'high.out'}",
                          "--wrap", "true")
    assert cluster.wait_finished([high], timeout=60) == {high: "COMPLETED"}
    assert cluster.wait_finished([low], timeout=60) == {low: "COMPLETED"}
    first_run, second_run = log.read_text().split("start 1")
    assert first_run.split()[:2] == ["start", "0"] and {"SIGUSR2", "SIGTERM"} <= set(first_run.split()), first_run
    assert not second_run.strip() and cluster.job(low)["Restarts"] == "1"


def test_squeue_keeps_finished_jobs_and_failed_dependencies_cancel(cluster: SlurmCluster, tmp_path):
    """`squeue -t all` lists COMPLETED/FAILED/CANCELLED jobs (MinJobAge), and an afterok
    dependent of a failed job is cancelled with Reason=DependencyNeverSatisfied."""
    out = f"--output={tmp_path / '%j-%A.out'}"
    ok = cluster.sbatch(out, "--wrap", "true")
    failed = cluster.sbatch(out, "--wrap", "sleep 1; exit 3")
    dependent = cluster.sbatch(out, f"--dependency=afterok:{failed}", "--kill-on-invalid-dep=yes",
                               "--wrap", "echo should not run")
    cancelled = cluster.sbatch(out, "--wrap", "exec sleep 300")
    cluster.wait_for(lambda: cluster.squeue_states([cancelled]).get(cancelled) == "RUNNING", 60,
                     f"job {cancelled} to run")
    cluster.run("scancel", cancelled)
    cluster.wait_finished([ok, failed, dependent, cancelled], timeout=60)
    listed = cluster.run("squeue", "-t", "all", "-h", "-o", "%i|%T|%r")
    rows = {line.split("|")[0]: line.split("|")[1:] for line in listed.splitlines()}
    assert rows[ok] == ["COMPLETED", "None"]
    assert rows[failed] == ["FAILED", "NonZeroExitCode"]
    assert rows[dependent] == ["CANCELLED", "DependencyNeverSatisfied"]
    assert rows[cancelled][0] == "CANCELLED"


def test_sacct_is_unavailable(cluster: SlurmCluster):
    """Accounting is off (accounting_storage/none): job history comes from squeue/scontrol only."""
    out = subprocess.run(["sacct"], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "accounting storage is disabled" in out.stdout + out.stderr

"""Submit a run's stages (or a sweep's points) as submitit jobs: cluster=slurm, or cluster=debug in-process.

A run's pending stages become a chain of jobs, each starting only after the
previous one succeeded (`afterok`; a failed stage cancels the rest of the
chain). The eval stage rides with the job before it: it takes seconds. A
sweep submits each stage of all its points as one job array, chained task by
task (`aftercorr`).
"""
from __future__ import annotations

import getpass
import shutil
import subprocess
from pathlib import Path

from omegaconf import DictConfig

from trainer.run_dir import RunDir, timestamped
from trainer.plan import plan

from .job import StageJob
from .records import SUBMITIT_DIR, append_job, latest_jobs

# squeue states of a job that still holds or waits for resources
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
               "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"}


class SubmitError(RuntimeError):
    """A one-line problem with submitting (no SLURM here, sbatch refused)."""


def job_groups(stages: list[str]) -> list[list[str]]:
    """One job per stage, except that eval joins the job before it."""
    groups: list[list[str]] = []
    for stage in stages:
        if stage == "eval" and groups:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def pending_stages(cfg: DictConfig, run: RunDir) -> list[str]:
    """The planned stages still to run (an explicit stage=eval always runs)."""
    stages = plan(cfg)
    if cfg.stage == "eval":
        return stages
    return [s for s in stages if not run.is_done(s)]


def queue_states() -> dict[str, tuple[str, str]]:
    """job id -> (state, reason) for this user's jobs SLURM still knows (array tasks one by one)."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        states[job_id.strip()] = (state.strip(), reason.strip())
    return states


def live_jobs(run_root: Path, queue: dict) -> dict[str, tuple[str, str]]:
    """stage -> (job id, state) for this run's stages whose newest job is queued or running."""
    live = {}
    for stage, record in latest_jobs(run_root).items():
        state = queue.get(record["job_id"], ("", ""))[0]
        if state in LIVE_STATES:
            live[stage] = (record["job_id"], state)
    return live


def make_executor(cfg: DictConfig, folder: Path):
    """submitit's AutoExecutor with every cluster.* setting applied."""
    import submitit

    c = cfg.cluster
    if c.name == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SubmitError("cluster=slurm needs the SLURM commands (sbatch, srun) on PATH; "
                          "run on a login node or use cluster=local")
    executor = submitit.AutoExecutor(folder=folder, cluster=c.name, slurm_max_num_timeout=c.max_timeouts)
    tasks = c.tasks_per_node or max(1, c.gpus_per_node)
    params = dict(nodes=c.nodes, tasks_per_node=tasks, cpus_per_task=c.cpus_per_task, timeout_min=c.timeout_min,
                  slurm_signal_delay_s=c.signal_delay_s, slurm_array_parallelism=c.array_parallelism,
                  slurm_setup=list(c.setup))
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb:
        params["mem_gb"] = c.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if c[key]:
            params[f"slurm_{key}"] = c[key]
    executor.update_parameters(**params)
    return executor


def _extra(cfg: DictConfig, dependency: str | None) -> dict:
    extra = dict(cfg.cluster.extra_sbatch)
    if dependency:
        # kill-on-invalid-dep: when the stage before fails, SLURM cancels this job instead of leaving it
        # pending forever with DependencyNeverSatisfied.
        extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
    return extra


def _submit(executor, cfg: DictConfig, name: str, jobs: list[StageJob], dependency: str | None):
    executor.update_parameters(name=name, slurm_additional_parameters=_extra(cfg, dependency))
    try:
        if len(jobs) == 1:
            return [executor.submit(jobs[0])]
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
        return submitted
    except Exception as e:  # noqa: BLE001 - sbatch's refusal (bad partition, account...) in one line
        raise SubmitError(f"sbatch refused the {name} job: {str(e).strip().splitlines()[-1]}") from None


def _log_path(folder: Path, job) -> Path:
    return folder / f"{job.job_id}_0_log.out"


def submit_run(cfg: DictConfig, say=print) -> list:
    """Submit the run's pending stages as a dependency chain; returns the submitted submitit jobs."""
    if cfg.resume == "never":
        cfg.run = timestamped(cfg.run)
        cfg.resume = "auto"  # the jobs (and their requeues) continue this new run
    run = RunDir(cfg.runs_dir, cfg.run)
    pending = pending_stages(cfg, run)
    if not pending:
        say(run.finished_note(plan(cfg), "nothing to submit"))
        return []
    if cfg.cluster.name == "slurm":
        live = live_jobs(run.root, queue_states())
        if live:
            jobs = ", ".join(f"{stage} job {job_id} ({state})" for stage, (job_id, state) in live.items())
            say(f"run '{cfg.run}' already has {jobs}; not submitting again. "
                f"Follow it: stage=status run={cfg.run}; stop it: stage=cancel run={cfg.run}")
            return []
    run.write_config(cfg)
    folder = run.root / SUBMITIT_DIR
    executor = make_executor(cfg, folder)
    prefix = cfg.cluster.job_name or cfg.run
    submitted, previous = [], None
    for stages in job_groups(pending):
        dependency = f"afterok:{previous.job_id}" if previous is not None else None
        job = _submit(executor, cfg, f"{prefix}:{stages[0]}", [StageJob(cfg, stages)], dependency)[0]
        append_job(run.root, job_id=str(job.job_id), stages=stages, depends_on=previous and str(previous.job_id),
                   cluster=cfg.cluster.name)
        resume = _resume_note(run, stages[0])
        say(f"{'+'.join(stages)}: job {job.job_id}{f' after {previous.job_id}' if previous else ''}{resume}  "
            f"log {_log_path(folder, job)}")
        submitted.append(job)
        previous = job
        if cfg.cluster.name == "debug":
            job.result()  # runs here, now; an error stops the chain like a failed afterok dependency
    say(f"run '{cfg.run}': {len(submitted)} job(s) submitted; follow with "
        f"python slurm/launch.py stage=status run={cfg.run}")
    return submitted


def _resume_note(run: RunDir, stage: str) -> str:
    newest = run.newest_checkpoint(stage)
    return f" (resumes from {newest})" if newest else ""


def submit_shared_dense(shared: list[DictConfig], queue: dict, say=print) -> list[str]:
    """Submit the sweep's shared dense runs; returns the job ids the points must wait for (afterok)."""
    waits = []
    for cfg in shared:
        run = RunDir(cfg.runs_dir, cfg.run)
        live = live_jobs(run.root, queue) if queue else {}
        if "dense" in live:
            say(f"{cfg.run}: dense job {live['dense'][0]} ({live['dense'][1]}) already queued; the points wait for it")
            waits.append(live["dense"][0])
            continue
        waits += [str(job.job_id) for job in submit_run(cfg, say=say)]
    return waits


def submit_sweep(points: list[DictConfig], sweep_root: Path, base: DictConfig, say=print,
                 shared: list[DictConfig] = ()) -> dict[str, list]:
    """Submit every point's pending stages, one job array per stage, chained task by task.

    The shared dense runs go first, as jobs of their own; every point's first job waits for them.
    Points whose plans differ (say, some start from given weights) form separate chains. Returns
    point run name -> its submitted job ids.
    """
    queue = queue_states() if base.cluster.name == "slurm" else {}
    dense_jobs = submit_shared_dense(list(shared), queue, say)
    chains: dict[tuple, list[DictConfig]] = {}
    for cfg in points:
        run = RunDir(cfg.runs_dir, cfg.run)
        pending = pending_stages(cfg, run)
        live = live_jobs(run.root, queue) if queue else {}
        if not pending:
            say(f"{cfg.run}: finished, nothing to submit")
        elif live:
            say(f"{cfg.run}: already has " + ", ".join(f"{s} job {j} ({st})" for s, (j, st) in live.items()))
        else:
            run.write_config(cfg)
            chains.setdefault(tuple(tuple(g) for g in job_groups(pending)), []).append(cfg)
    folder = sweep_root / SUBMITIT_DIR
    executor = make_executor(base, folder)
    prefix = base.cluster.job_name or sweep_root.name
    ids: dict[str, list] = {}
    for groups, cfgs in chains.items():
        previous = None
        for stages in groups:
            # The first array waits for the shared dense runs (a whole-array afterok: every task prunes them).
            dependency = (f"aftercorr:{previous}" if previous
                          else f"afterok:{':'.join(dense_jobs)}" if dense_jobs else None)
            jobs = _submit(executor, base, f"{prefix}:{stages[0]}", [StageJob(c, list(stages)) for c in cfgs],
                           dependency)
            array = str(jobs[0].job_id).split("_")[0]
            for cfg, job in zip(cfgs, jobs):
                append_job(Path(cfg.runs_dir).expanduser() / cfg.run, job_id=str(job.job_id), stages=list(stages),
                           array=array, depends_on=previous or ":".join(dense_jobs) or None,
                           cluster=base.cluster.name)
                ids.setdefault(cfg.run, []).append(str(job.job_id))
            after = (f" after {previous} task by task" if previous
                     else f" after dense job(s) {', '.join(dense_jobs)}" if dense_jobs else "")
            say(f"{'+'.join(stages)}: array {array} of {len(jobs)} task(s){after}  logs {folder}")
            if base.cluster.name == "debug":
                for job in jobs:
                    job.result()
            previous = array
    return ids

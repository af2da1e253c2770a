"""`stage=status` and `stage=cancel` for a run or a sweep.

A stage's state comes from, in order: its result (done), SLURM's queue (for
a job that is pending or running), the job's own record (failed, requeued,
completed; see records.py), and otherwise its checkpoints (interrupted) or
nothing (not started). Progress and the last metrics come from the stage's
metrics.jsonl.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from trainer.run_dir import SWEEP_FILE, RunDir
from trainer.plan import plan

from .records import latest_jobs, read_state, write_state
from .submit import LIVE_STATES, queue_states


class StatusError(RuntimeError):
    """No such run or sweep (one-line message)."""


def _last_records(path: Path) -> tuple[dict | None, dict | None]:
    """The last train record and the last epoch record of a metrics.jsonl."""
    train = epoch = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill mid-write
            if record.get("kind") == "epoch":
                epoch = record
            elif record.get("kind") == "train":
                train = record
    return train, epoch


def _progress(run: RunDir, stage: str, epochs: int | None) -> str:
    train, epoch = _last_records(run.stage(stage) / "metrics.jsonl")
    latest = max((r for r in (train, epoch) if r), key=lambda r: r["step"], default=None)
    if latest is None:
        return ""
    parts = [f"epoch {latest['epoch']:.2f}/{epochs}" if epochs else f"epoch {latest['epoch']:.2f}",
             f"step {latest['step']}"]
    if train:
        parts.append(f"loss {train['loss']:.3f}")
    if epoch:
        parts.append(f"val top-1 {epoch['val_top1']:.2f}%")
    return ", ".join(parts)


def stage_state(run: RunDir, stage: str, queue: dict, states: dict) -> tuple[str, str]:
    """(state, detail) of one stage; `states` holds the states decided for earlier stages."""
    if run.is_done(stage):
        summary = run.summary(stage)
        detail = f"top-1 {summary['top1']:.2f}%" if summary.get("top1") is not None else ""
        return "done", detail
    record = latest_jobs(run.root).get(stage)
    if record is not None:
        job_id = record["job_id"]
        state, reason = queue.get(job_id, ("", ""))
        if state in LIVE_STATES:
            if state == "PENDING" and reason in ("DependencyNeverSatisfied", "Dependency"):
                why = "waiting for the stage before" if reason == "Dependency" else "the stage before failed"
                return "pending", f"job {job_id}: {why}"
            return state.lower(), f"job {job_id}" + (f" ({reason})" if reason and reason != "None" else "")
    own = read_state(run.root, stage)
    if own is not None and (record is None or own.get("job_id") == record["job_id"]):
        detail = f"job {own['job_id']}, {own['updated']}"
        if own.get("reason"):
            detail += f": {own['reason']}"
        if own["state"] == "failed" and own.get("log"):
            detail += f" (traceback: {own['log']})"
        if own["state"] in ("running", "requeued"):
            # The job's record says it runs but SLURM no longer has it: killed without a chance to say so.
            return "interrupted", detail + " (the job ended without finishing; relaunch the same command to resume)"
        return own["state"], detail
    if record is not None:
        upstream = next((s for s, st in states.items() if st in ("failed", "not run", "cancelled")), None)
        state = queue.get(record["job_id"], ("", ""))[0]
        if upstream:
            return "not run", f"job {record['job_id']} {state.lower() or 'ended'}: {upstream} did not succeed"
        return "not run", f"job {record['job_id']} {state.lower() or 'ended'} before starting"
    if run.newest_checkpoint(stage):
        return "interrupted", "has a checkpoint; relaunch the same command to resume"
    return "not started", ""


def run_status(run_root: Path, queue: dict) -> list[dict]:
    """One row per stage of the run at `run_root` that was asked for (has a directory or a job), in plan order;
    every planned stage when none was."""
    cfg = OmegaConf.load(run_root / "config.yaml")
    cfg.stage = "all"
    run = RunDir(run_root.parent, run_root.name)
    jobs = latest_jobs(run_root)
    stages = [s for s in plan(cfg) if run.stage(s).exists() or s in jobs] or plan(cfg)
    rows, states = [], {}
    for stage in stages:
        state, detail = stage_state(run, stage, queue, states)
        states[stage] = state
        epochs = cfg[stage].epochs if stage in ("dense", "search", "finetune") else None
        progress = _progress(run, stage, epochs) if state != "done" else ""
        rows.append({"stage": stage, "state": state, "detail": detail, "progress": progress})
    return rows


def _resolve(runs_dir: str, name: str) -> Path:
    root = Path(runs_dir).expanduser() / name
    if (root / SWEEP_FILE).exists() or (root / "config.yaml").exists():
        return root
    raise StatusError(f"no run or sweep '{name}' in {Path(runs_dir).expanduser()} "
                      f"(runs there: {', '.join(sorted(p.name for p in Path(runs_dir).expanduser().glob('*'))) or 'none'})")


def _overall(rows: list[dict]) -> str:
    states = [r["state"] for r in rows]
    if all(s == "done" for s in states):
        return "done"
    for s in ("failed", "cancelled", "running", "requeued", "pending", "interrupted", "not run"):
        if s in states:
            return s
    return states[-1] if states else "empty"


def show_status(runs_dir: str, name: str, say=print) -> int:
    root = _resolve(runs_dir, name)
    queue = queue_states()
    if (root / SWEEP_FILE).exists():
        sweep = json.loads((root / SWEEP_FILE).read_text())
        counts: dict[str, int] = {}
        shared = sweep.get("shared", [])
        say(f"sweep '{sweep['name']}' ({len(sweep['points'])} points"
            f"{f', sharing {len(shared)} dense run(s)' if shared else ''}, {root})")
        for point in shared + sweep["points"]:
            point_root = root / point["run"]
            rows = run_status(point_root, queue) if (point_root / "config.yaml").exists() else []
            overall = _overall(rows)
            counts[overall] = counts.get(overall, 0) + 1
            stages = "  ".join(f"{r['stage']}: {r['state']}" + (f" ({r['detail']})" if r["detail"] else "")
                               + (f" [{r['progress']}]" if r["progress"] else "") for r in rows)
            say(f"  {point['run']:<40} {overall:<12} {stages}")
        say("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        return 0
    say(f"run '{root.name}' ({root})")
    for r in run_status(root, queue):
        say(f"  {r['stage']:<9} {r['state']:<12} {r['detail']}" + (f"  [{r['progress']}]" if r["progress"] else ""))
    return 0


def cancel(runs_dir: str, name: str, say=print) -> int:
    """scancel every queued or running job of the run (or of each point of the sweep)."""
    root = _resolve(runs_dir, name)
    if (root / SWEEP_FILE).exists():
        sweep = json.loads((root / SWEEP_FILE).read_text())
        roots = [root / p["run"] for p in sweep.get("shared", []) + sweep["points"]]
    else:
        roots = [root]
    queue = queue_states()
    cancelled = []
    for run_root in roots:
        for stage, record in latest_jobs(run_root).items():
            job_id = record["job_id"]
            state = queue.get(job_id, ("", ""))[0]
            if state in LIVE_STATES and job_id not in cancelled:
                if state != "PENDING":
                    # A plain scancel sends SIGTERM, which submitit ignores, and the job would go on for
                    # KillWait seconds (it may even finish). Kill its processes now: a relaunch resumes
                    # from the last checkpoint.
                    subprocess.run(["scancel", "--signal=KILL", job_id], check=False, timeout=60)
                subprocess.run(["scancel", job_id], check=False, timeout=60)
                cancelled.append(job_id)
                write_state(run_root, record["stages"], job_id, "cancelled",
                            reason="stage=cancel; relaunch the same command to resume")
    say(f"cancelled {len(cancelled)} job(s): {', '.join(cancelled)}" if cancelled
        else f"'{name}' has no queued or running jobs")
    return 0

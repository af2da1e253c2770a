"""What the launcher and the jobs write about jobs, next to the run they belong to.

    runs/<run>/jobs.jsonl         one line per submitted job (written by the launcher)
    runs/<run>/<stage>/job.json   the job's own account of itself: running, requeued, completed, failed
    runs/<run>/submitit/          submitit's job scripts, pickles and logs (<job id>_<task>_log.out/.err)

A sweep keeps the same files per point under runs/<sweep>/<point>/, its array
jobs' logs in runs/<sweep>/submitit/, and lists its points in
runs/<sweep>/sweep.json.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from trainer.run_dir import write_json

JOBS_FILE = "jobs.jsonl"
STATE_FILE = "job.json"
SUBMITIT_DIR = "submitit"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def append_job(run_root: Path, **record) -> None:
    run_root.mkdir(parents=True, exist_ok=True)
    with open(run_root / JOBS_FILE, "a") as f:
        f.write(json.dumps({"submitted": now(), **record}) + "\n")


def read_jobs(run_root: Path) -> list[dict]:
    path = run_root / JOBS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_jobs(run_root: Path) -> dict[str, dict]:
    """The newest submitted job of every stage (a relaunch supersedes older ones)."""
    latest = {}
    for record in read_jobs(run_root):
        for stage in record["stages"]:
            latest[stage] = record
    return latest


def read_state(run_root: Path, stage: str) -> dict | None:
    path = run_root / stage / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_state(run_root: Path, stages: list[str], job_id: str, state: str, **fields) -> None:
    """Record a job's state for each of its stages; `starts` counts the times this job id started."""
    for stage in stages:
        old = read_state(run_root, stage) or {}
        same_job = old.get("job_id") == job_id
        starts = old.get("starts", 0) if same_job else 0
        if state == "running":
            starts += 1
        # Every state this job id went through, oldest first (a requeued job keeps its id).
        history = (old.get("history", []) if same_job else []) + [
            {"state": state, "at": now(), **{k: v for k, v in fields.items() if k in ("reason", "step")}}]
        (run_root / stage).mkdir(parents=True, exist_ok=True)
        write_json(run_root / stage / STATE_FILE, {"job_id": job_id, "state": state, "updated": now(),
                                                   "host": socket.gethostname(), "starts": starts, **fields,
                                                   "history": history})

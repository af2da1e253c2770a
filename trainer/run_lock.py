"""One writer per run: an advisory lock on `<run>/.lock`, held by the process that runs the run.

The lock is `flock(2)` on an open file, not the file's existence: the kernel drops it when the holder
exits however it ends (SIGKILL, OOM, a node that reboots drops its NFS locks), so there is never a stale
lock to delete by hand. The file only says who holds it (pid, host, since when) for the error a second
launch prints. One process per run takes it: the launcher of a local run or sweep (rank 0 under torchrun),
rank 0 of a SLURM job. Torch-free, so that a second launch fails in the time it takes to read the config.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run; str(e) is one line naming it."""


def _holder(fd: int) -> dict:
    """Who holds the lock; {} if the holder has not written itself down yet (it does right after locking)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace")
        try:
            return json.loads(text)
        except ValueError:
            time.sleep(0.05)
    return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that is just starting"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('since')}"


def _take(fd: int, wait_s: float, say) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            if say is not None:
                say(f"waiting up to {wait_s:.0f} s for the run's lock, held by {_describe(_holder(fd))}", flush=True)
                say = None
            time.sleep(1.0)


@contextmanager
def run_lock(root: Path, what: str = "run", wait_s: float = 0.0, say=None):
    """Hold `root/.lock` for the duration of the block, or raise RunLocked if another process holds it
    (at once, or after `wait_s` seconds: a SLURM job whose predecessor is still being killed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if not _take(fd, wait_s, say):
        holder = _holder(fd)
        os.close(fd)
        raise RunLocked(f"{what} '{root.name}' is already running ({_describe(holder)}); two launches would write the same "
                        f"checkpoints. Wait for it, or stop it and relaunch to resume ({root / LOCK_FILE})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (it means nothing without a holder)

"""Where this process sits in the job: torchrun's environment, SLURM's, or a single process."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    # The process's index on its node; None when the launcher did not say (RANK/WORLD_SIZE set by hand, no
    # LOCAL_RANK or SLURM_LOCALID): fine on CPU, an error where it picks a GPU (trainer/engines/base.py).
    local_rank: int | None = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def detect_env(environ=None) -> DistEnv:
    """Read the launcher's variables. torchrun wins over SLURM (torchrun inside an allocation)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = int(env["WORLD_SIZE"])
        # Without LOCAL_RANK (a launcher that exports only RANK/WORLD_SIZE), SLURM's own index on the node;
        # guessing 0 would put every process of a node on cuda:0.
        local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
        local_rank = int(local) if local is not None else (0 if world_size == 1 else None)
        return DistEnv(int(env["RANK"]), world_size, local_rank,
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(env.get("MASTER_PORT", 20000 + job % 20000)), "slurm")
    return DistEnv()

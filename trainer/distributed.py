"""Where this process sits in the job (torchrun's environment, SLURM's, or a single process), and how it
meets the others: the rendezvous address and the network interface, said in one line and checked across nodes."""
from __future__ import annotations

import ipaddress
import os
import socket
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
    num_nodes: int = 1


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _num_nodes(env, world_size: int) -> int:
    """Nodes of the job: SLURM's count, else torchrun's (WORLD_SIZE / LOCAL_WORLD_SIZE), else one."""
    for key in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(key, "").isdigit():
            return int(env[key])
    local_world = env.get("LOCAL_WORLD_SIZE", "")
    return max(1, world_size // int(local_world)) if local_world.isdigit() and int(local_world) > 0 else 1


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
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
                       _num_nodes(env, world_size))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(env.get("MASTER_PORT", 20000 + job % 20000)), "slurm",
                       _num_nodes(env, int(env["SLURM_NTASKS"])))
    return DistEnv()


# The variables that pin the interface each library's sockets use; without them gloo takes the address the
# host name resolves to, and NCCL the first interface that is not loopback or docker.
SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _resolve(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def rendezvous_line(env: DistEnv, environ=None, hostname: str | None = None) -> str:
    """What a process says before it joins: where the group meets and which address its own sockets take."""
    environ = os.environ if environ is None else environ
    host = hostname or socket.gethostname()
    master_ip = _resolve(env.master_addr)
    at = "" if master_ip in (None, env.master_addr) else f" ({master_ip})"
    pinned = [f"{k}={environ[k]}" for k in SOCKET_IFNAME_VARS if environ.get(k)]
    own = ", ".join(pinned) if pinned else f"host {host} ({_resolve(host) or 'unresolved'})"
    nodes = f" on {env.num_nodes} nodes" if env.num_nodes > 1 else ""
    return (f"rank {env.rank}/{env.world_size}{nodes}: rendezvous tcp://{env.master_addr}:{env.master_port}{at}, "
            f"sockets: {own}")


def check_multi_node_network(env: DistEnv, environ=None, hostname: str | None = None) -> None:
    """Fail in one line where a job spanning nodes could only hang: gloo (the control group always, the whole
    job on CPUs) binds to the address its host name resolves to, and a loopback one (Debian's 127.0.1.1 line
    in /etc/hosts) cannot be reached from the other nodes. Pinning the interface avoids the lookup."""
    environ = os.environ if environ is None else environ
    if env.num_nodes <= 1 or environ.get("GLOO_SOCKET_IFNAME"):
        return
    host = hostname or socket.gethostname()
    address = _resolve(host)
    if address is None or ipaddress.ip_address(address).is_loopback:
        found = "does not resolve" if address is None else f"resolves to the loopback address {address}"
        raise RuntimeError(
            f"this job spans {env.num_nodes} nodes, but host name {host!r} {found}: gloo would listen where the "
            f"other nodes cannot reach it and the job would hang at its rendezvous. Set GLOO_SOCKET_IFNAME (and "
            f"NCCL_SOCKET_IFNAME on GPUs) to the nodes' network interface, e.g. in cluster.setup: "
            f"[\"export GLOO_SOCKET_IFNAME=ib0\"] (`ip -br addr` on a node lists them; docs/cluster.md)")

"""A real two-node SLURM cluster on one machine, for the multi-node tests (tests/test_slurm_multinode.py).

Each node is a network namespace with its own host name (a UTS namespace), its own address on a veth pair
plugged into a bridge, and its own `slurmd`; one `slurmctld` runs on the machine itself, on the bridge's
address, and munge is shared (its socket is a file, which namespaces do not hide). So a job sees what it
sees on a cluster: two hosts (`testnode1`, `testnode2`) with two addresses, MASTER_ADDR taken from the
allocation, gloo connecting across the bridge, srun reaching the other node's slurmd. What it does not see:
another machine's disk (runs_dir is shared, as on a cluster's shared filesystem) or another machine's cores
(both nodes report, and share, this machine's CPUs).

The addresses are 198.18.X.0/24, in RFC 2544's benchmarking range 198.18.0.0/15: never routed, so they
clash with no real network; X is the first third octet no interface of this machine uses (chosen under a
lock, so that two test sessions on one machine take two subnets). Inside each node's mount namespace
/etc/hosts names the nodes (the host names must resolve, as on a cluster) and /etc/resolv.conf points at a
loopback name server that does not exist: c10d looks up the name of every peer's IPv6-mapped address, which
/etc/hosts cannot answer, and the machine's own name server is unreachable from the namespace (10 s per
lookup until it times out); a refused query fails at once.

The session fixture `two_node_cluster` starts it, or skips with `two_node_unavailable_reason()` where the
machine cannot (not root, SLURM missing, or namespaces, veth pairs or bridges not allowed, as in most
unprivileged containers).
"""
from __future__ import annotations

import fcntl
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from slurm_cluster import SlurmCluster, SlurmError, session_cluster, slurm_unavailable_reason, which

NODES = ("testnode1", "testnode2")
SUBNET_PREFIX = "198.18"  # RFC 2544: reserved for network tests, never routed
NETWORK_LOCK = Path("/run/lock/vp-prune-test-network.lock")
NETWORK_PROGRAMS = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "mount": "mount"}


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = [which("ip"), *(("-n", netns) if netns else ()), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")


def two_node_unavailable_reason() -> str | None:
    """Why this machine cannot run the two-node cluster, or None when it can (it tries a namespace, a veth
    pair and a bridge, and removes them)."""
    reason = slurm_unavailable_reason()
    if reason:
        return reason.replace("local SLURM cluster", "two-node SLURM cluster")
    missing = [f"{p} (apt package {pkg})" for p, pkg in NETWORK_PROGRAMS.items() if which(p) is None]
    if missing:
        return f"two-node SLURM cluster unavailable: {', '.join(missing)} not installed"
    probe = f"vpprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
        try:
            _ip("link", "add", f"{probe}a", "type", "veth", "peer", "name", "eth0", "netns", probe)
            _ip("link", "add", f"{probe}b", "type", "bridge")
        finally:
            for link in (f"{probe}a", f"{probe}b"):
                subprocess.run([which("ip"), "link", "del", link], capture_output=True, timeout=30)
            subprocess.run([which("ip"), "netns", "del", probe], capture_output=True, timeout=30)
    except (SlurmError, OSError, subprocess.SubprocessError) as err:
        return f"two-node SLURM cluster unavailable: network namespaces, veth pairs or bridges cannot be made here ({err})"
    return None


class TestNetwork:
    """A bridge on 198.18.X.1 and one namespace per node on 198.18.X.(10+i), each with `eth0` on the bridge."""

    def __init__(self, nodes: tuple[str, ...]):
        self.nodes = nodes
        self.octet: int | None = None

    @property
    def bridge(self) -> str:
        return f"vpbr{self.octet}"

    def namespace(self, node: str) -> str:
        return f"vp{self.octet}-{node}"

    def address(self, node: str | None = None) -> str:
        """The node's address; the machine's own (the bridge's) for None."""
        return f"{SUBNET_PREFIX}.{self.octet}.{1 if node is None else 11 + self.nodes.index(node)}"

    def create(self) -> "TestNetwork":
        NETWORK_LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(NETWORK_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions must not take the same subnet
            self.octet = self._free_octet()
            try:
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.address()}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
                for i, node in enumerate(self.nodes, start=1):
                    ns, host_end = self.namespace(node), f"vp{self.octet}h{i}"
                    _ip("netns", "add", ns)
                    _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
                    _ip("link", "set", host_end, "master", self.bridge, "up")
                    _ip("addr", "add", f"{self.address(node)}/24", "dev", "eth0", netns=ns)
                    for link in ("eth0", "lo"):
                        _ip("link", "set", link, "up", netns=ns)
            except BaseException:
                self.remove()
                raise
        return self

    def remove(self) -> None:
        """Delete the namespaces (their veth ends go with them) and the bridge; what is already gone is fine."""
        if self.octet is None:
            return
        for node in self.nodes:
            subprocess.run([which("ip"), "netns", "del", self.namespace(node)], capture_output=True, timeout=30)
        subprocess.run([which("ip"), "link", "del", self.bridge], capture_output=True, timeout=30)

    def _free_octet(self) -> int:
        out = subprocess.run([which("ip"), "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
        used = {int(m) for m in re.findall(rf"\b{re.escape(SUBNET_PREFIX)}\.(\d+)\.", out)}
        links = subprocess.run([which("ip"), "-o", "link"], capture_output=True, text=True, timeout=30).stdout
        used |= {int(m) for m in re.findall(r"\bvpbr(\d+)\b", links)}  # a crashed session's bridge, down
        free = [x for x in range(2, 255) if x not in used]
        if not free:
            raise SlurmError(f"no free {SUBNET_PREFIX}.X.0/24 subnet for the test network")
        return free[0]


class TwoNodeSlurmCluster(SlurmCluster):
    """A SlurmCluster whose two nodes are network namespaces (module docstring). `node` is the node list
    (testnode[1-2]), `nodes` the names; `cpus` and `memory_mb` are one node's."""

    slurmd_files = "slurmd.%n"

    def __init__(self, root=None, startup_timeout: float = 60):
        super().__init__(root, startup_timeout)
        self.nodes = NODES
        self.network = TestNetwork(NODES)

    def _lay_out(self, hardware: dict[str, str]) -> None:
        """The nodes' spool folders, the network, and the name files bound into each node."""
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.node = f"testnode[1-{len(self.nodes)}]"
        self.network.create()
        self._write_name_files(hardware["NodeName"])

    def _start_slurmds(self) -> None:
        for node in self.nodes:
            self._start_daemon(f"slurmd.{node}", self._inside(node))

    def stop(self, remove: bool = False) -> None:
        super().stop(remove)
        self.network.remove()

    def _daemons(self) -> list[str]:
        return [*(f"slurmd.{node}" for node in self.nodes), "slurmctld"]

    def _inside(self, node: str) -> list[str]:
        """A command prefix that runs its arguments on `node`: in its network namespace, under its own host
        name, with the cluster's /etc/hosts and /etc/resolv.conf bound over the machine's (for that process
        tree only: unshare makes the mounts private)."""
        ns_file = f"/run/netns/{self.network.namespace(node)}"
        setup = (f"mount --bind {self.root / 'hosts'} /etc/hosts && mount --bind {self.root / 'resolv.conf'} "
                 f"/etc/resolv.conf && hostname {node} && exec \"$@\"")
        return [which("nsenter"), f"--net={ns_file}", which("unshare"), "--uts", "--mount", "sh", "-c", setup,
                "sh"]

    def _write_name_files(self, controller: str) -> None:
        lines = ["127.0.0.1 localhost", f"{self.network.address()} {controller}",
                 *(f"{self.network.address(n)} {n}" for n in self.nodes)]
        (self.root / "hosts").write_text("\n".join(lines) + "\n")
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _slurm_conf(self, hardware: dict[str, str], ctld_port: int, slurmd_port: int) -> str:
        shape = " ".join(f"{k}={hardware[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                         "ThreadsPerCore", "RealMemory"))
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.network.address(n)} {shape} State=UNKNOWN"
                          for n in self.nodes)
        return f"""\
# Generated by tests/slurm_multinode.py for one test session: nodes are network namespaces of this machine.
ClusterName=pytest2
SlurmctldHost={hardware["NodeName"]}({self.network.address()})
{self._common_conf(ctld_port, slurmd_port)}
{nodes}
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName={self.preempt_partition} Nodes={self.node} Default=NO MaxTime=INFINITE State=UP PriorityTier=2
"""


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory) -> Iterator[TwoNodeSlurmCluster]:
    """One running two-node cluster for the session; skips where the machine cannot run it."""
    # a shorter root than the single node's: the spool holds a folder per node
    yield from session_cluster(tmp_path_factory, TwoNodeSlurmCluster, two_node_unavailable_reason(), "slurm2",
                               max_root=50)

"""A real, throw-away single-node SLURM cluster for the `slurm`-marked tests.

`SlurmCluster` starts slurmctld and slurmd (Debian slurm-wlm 22.05, as root) on a slurm.conf it
generates from `slurmd -C`, with every pid, log, state and spool file under one temporary
directory, and on free TCP ports so that a system SLURM on the same machine cannot clash with it.
Authentication uses the system munged, which is started (and given a key) if it is not running.

Tests reach the cluster through `cluster.env`: the environment with SLURM_CONF pointing at the
generated slurm.conf. Pass it to every sbatch/squeue/scontrol/scancel subprocess; sbatch exports
it into the jobs too, so a job's own `scontrol requeue $SLURM_JOB_ID` talks to this cluster.

The session fixture `slurm_cluster` starts one cluster per test session, or skips with
`slurm_unavailable_reason()` where the machine cannot run one (not root, packages missing).
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import pytest

T = TypeVar("T")

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_PID_FILE = MUNGE_RUN_DIR / "munged.pid"
# Directories munged needs besides its socket directory, all owned by the munge user.
MUNGE_DIRS = (Path("/etc/munge"), Path("/var/lib/munge"), Path("/var/log/munge"), MUNGE_RUN_DIR)

# Environment prefixes that change what the SLURM clients do (SQUEUE_FORMAT would break the
# parsing below; SBATCH_* would add options to every submission; SLURM_* may describe an outer
# job when the tests themselves run inside one). The cluster's environment drops them all.
CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_",
                       "SCANCEL_", "SACCT_")

# A requeued job is held (Reason=BeginTime) for cred_expire+1 seconds before it may start again:
# 121 s with the default cred_expire=120. 5 is the smallest value slurm 22.05 accepts; the
# credential only has to survive the local controller -> slurmd hop, which takes milliseconds.
CRED_EXPIRE_S = 5

# Job states after which a job will not run again (unless requeued by hand).
FINISHED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
REQUIRED_PROGRAMS = {"slurmctld": "slurmctld (apt package slurm-wlm)", "slurmd": "slurmd (apt package slurm-wlm)",
                     "sbatch": "sbatch (apt package slurm-wlm)", "munged": "munged (apt package munge)"}


def which(program: str) -> str | None:
    """Full path of a program, looking in the sbin directories too (a non-login PATH may lack them)."""
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))


def slurm_unavailable_reason() -> str | None:
    """Why this machine cannot run the local cluster, or None when it can."""
    missing = [what for program, what in REQUIRED_PROGRAMS.items() if which(program) is None]
    if missing:
        return (f"local SLURM cluster unavailable: {', '.join(missing)} not installed; "
                "install them with `apt-get install slurm-wlm munge` or `bash .ci/setup.sh`")
    if os.geteuid() != 0:
        return "local SLURM cluster unavailable: slurmctld/slurmd must run as root (SlurmUser=root)"
    return None


class SlurmError(RuntimeError):
    """The cluster could not be started, or a SLURM command failed."""


class SlurmCluster:
    """A single-node SLURM cluster living under `root` (a new temporary directory by default).

    Attributes: root, conf (slurm.conf), env (for every SLURM subprocess), partition (the default
    one), preempt_partition, and, once started, node, cpus and memory_mb (from `slurmd -C`).
    Methods: start/stop (also a context manager), run, sbatch, squeue_states, job, release,
    cancel_all, wait_for, wait_finished, wait_idle.
    """

    partition = "debug"  # the default partition
    # A second partition on the same node with a higher PriorityTier: a job submitted to it
    # preempts (requeues) jobs of `partition`, the way a cluster preempts a low-priority job.
    preempt_partition = "urgent"

    def __init__(self, root: str | os.PathLike | None = None, startup_timeout: float = 60):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
        self.conf = self.root / "slurm.conf"
        self.env = self._client_env()
        self.startup_timeout = startup_timeout
        self.node: str | None = None
        self.cpus = 0
        self.memory_mb = 0
        self.started_munged = False
        self._running = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "SlurmCluster":
        """Bring munged, slurmctld and slurmd up and wait until the node is idle."""
        self._running = True  # from here on stop() has something to clean up
        atexit.register(self.stop)  # in case the session dies without running fixture teardown
        try:
            for sub in ("state", "spool"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.started_munged = ensure_munged()
            hardware = node_hardware()
            self.cpus, self.memory_mb = int(hardware["CPUs"]), int(hardware["RealMemory"])
            self._lay_out(hardware)
            self.conf.write_text(self._slurm_conf(hardware, *free_ports(2)))
            self._start_daemon("slurmctld")
            self._start_slurmds()
            self.wait_for(self._node_idle, self.startup_timeout, f"node(s) {self.node} to become idle",
                          on_timeout=self._daemon_logs)
        except BaseException:
            self.stop()
            raise
        return self

    def _lay_out(self, hardware: dict[str, str]) -> None:
        """Name the node(s) and make what they need before slurm.conf is written: here, this machine."""
        self.node = hardware["NodeName"]

    def _start_slurmds(self) -> None:
        self._start_daemon("slurmd")

    def stop(self, remove: bool = False) -> None:
        """Cancel every job, stop slurmd and slurmctld, and stop munged if start() started it.

        Logs, state and job files stay under `root` for debugging unless `remove` is set.
        """
        if self._running:
            self._running = False
            atexit.unregister(self.stop)
            if self.conf.exists():
                self.cancel_all()
            for daemon in self._daemons():
                stop_pid_file(self._pid_file(daemon))
            if self.started_munged and not foreign_slurm_daemons():
                stop_pid_file(MUNGE_PID_FILE)
                self.started_munged = False
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- commands

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        """Run a command against this cluster and return its stdout; raise SlurmError on failure."""
        out = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, cmd))} exited {out.returncode}\n"
                             f"stdout: {out.stdout}\nstderr: {out.stderr}")
        return out.stdout

    def sbatch(self, *args: str) -> str:
        """Submit a batch job (sbatch arguments as given) and return its job id."""
        return self.run("sbatch", "--parsable", *args).strip().split(";")[0]

    def squeue_states(self, job_ids: Iterable[str | int]) -> dict[str, str]:
        """State (e.g. PENDING, RUNNING, COMPLETED) of each job id squeue still knows, finished ones included."""
        ids = ",".join(str(j) for j in job_ids)
        if not ids:
            return {}
        # check=False: squeue fails outright when none of the ids is known any more.
        out = self.run("squeue", "-h", "-t", "all", "-j", ids, "-o", "%i|%T", check=False)
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)

    def job(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, BatchHost, ...)."""
        fields = {}
        for token in self.run("scontrol", "-o", "show", "job", str(job_id)).split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def release(self, job_id: str | int, timeout: float = 60) -> None:
        """Let a requeued job start again in about 2 s instead of after its BeginTime hold (CRED_EXPIRE_S+1 s).

        A requeue completes asynchronously (the job goes through COMPLETING first), and setting
        StartTime before the job is back in PENDING has no effect, so wait for PENDING first.
        Not `starttime=now`: slurmd refuses ("Job credential revoked") and the job FAILS when it is
        launched again within the same second as it was killed (revocation has 1 s resolution).
        """
        self.wait_for(lambda: self.squeue_states([job_id]).get(str(job_id)) == "PENDING", timeout,
                      f"job {job_id} to be pending again")
        self.run("scontrol", "update", f"jobid={job_id}", "starttime=now+2")

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait until their processes are gone (up to KillWait=10 s).

        stop() does this first: slurmstepd outlives slurmd, so stopping the daemons with jobs
        still running would leave job processes behind.
        """
        try:
            ids = self.run("squeue", "-h", "-o", "%i", check=False).split()
            if ids:
                self.run("scancel", *ids, check=False)
                self.wait_idle(timeout)  # KillWait=10: SIGTERM, then SIGKILL 10 s later
        except (AssertionError, SlurmError, subprocess.SubprocessError, OSError) as err:
            print(f"slurm_cluster: jobs may be left running: {err}")

    # ---------------------------------------------------------------- waiting

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2,
                 on_timeout: Callable[[], str] | None = None) -> T:
        """Poll `predicate` until it returns something truthy and return that.

        On timeout raise AssertionError naming `what`, with the queue (or `on_timeout()`) attached.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                details = on_timeout() if on_timeout else self._queue_snapshot()
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{details}")
            time.sleep(interval)

    def wait_finished(self, job_ids: Iterable[str | int], timeout: float) -> dict[str, str]:
        """Wait until every job is in a final state; return their states."""
        ids = [str(j) for j in job_ids]

        def finished():
            states = self.squeue_states(ids)
            return states if all(states.get(j) in FINISHED_STATES for j in ids) else None

        return self.wait_for(finished, timeout, f"jobs {', '.join(ids)} to finish")

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until squeue lists no pending, running or completing job."""
        self.wait_for(lambda: not self.run("squeue", "-h", "-o", "%i").strip(), timeout, "an empty queue")

    # ---------------------------------------------------------------- internals

    def _daemons(self) -> list[str]:
        """The daemons as their pid and log files are named, in the order stop() ends them."""
        return ["slurmd", "slurmctld"]

    def _client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _pid_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def _log_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.log"

    def _slurm_conf(self, hardware: dict[str, str], ctld_port: int, slurmd_port: int) -> str:
        node = hardware["NodeName"]
        shape = " ".join(f"{k}={hardware[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                         "ThreadsPerCore", "RealMemory"))
        return f"""\
# Generated by tests/slurm_cluster.py for one test session.
ClusterName=pytest
# Loopback addresses: the cluster must not depend on the host name resolving.
SlurmctldHost={node}(127.0.0.1)
{self._common_conf(ctld_port, slurmd_port)}
NodeName={node} NodeAddr=127.0.0.1 {shape} State=UNKNOWN
PartitionName={self.partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName={self.preempt_partition} Nodes={node} Default=NO MaxTime=INFINITE State=UP PriorityTier=2
"""

    # slurmd's own files; a cluster of several slurmds names them per node (%n, the node name)
    slurmd_files = "slurmd"

    def _common_conf(self, ctld_port: int, slurmd_port: int) -> str:
        """Everything in slurm.conf but the controller's address and the nodes and partitions."""
        root = self.root
        return f"""\
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 s before it may run again (default 121 s).
AuthInfo=cred_expire={CRED_EXPIRE_S}
# Containers have no usable cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
# Preempted jobs are requeued. partition_prio only lets a higher-PriorityTier partition preempt
# a lower one, hence the second partition below: a job in it preempts jobs in the default one.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# A preempted job first gets its --signal (e.g. USR2), as at its time limit, so it can checkpoint.
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Finished jobs stay visible to squeue -t all and scontrol show job for the whole session.
MinJobAge=3600
KillWait=10
# Schedule within a second of any change, not every 60 s.
SchedulerParameters=sched_interval=1,bf_interval=1
# There is no mail on a test machine; the default /usr/bin/mail only logs an error.
MailProg=/bin/true
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/{self.slurmd_files}.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/{self.slurmd_files}.log
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool{"/%n" if "%n" in self.slurmd_files else ""}
SlurmctldDebug=info
SlurmdDebug=info"""

    def _start_daemon(self, daemon: str, wrapper: Iterable[str] = ()) -> None:
        """Start slurmctld or slurmd (through `wrapper`, a command that runs its arguments, if given); it
        daemonizes and writes its pid file under root, named `daemon`."""
        program = which(daemon.split(".")[0])
        out = subprocess.run([*wrapper, program, "-f", str(self.conf)], env=self.env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise SlurmError(f"{daemon} exited {out.returncode}: {out.stderr}\n{self._daemon_logs()}")
        self.wait_for(lambda: read_pid(self._pid_file(daemon)), 30, f"{daemon} to write its pid file",
                      on_timeout=self._daemon_logs)

    def _node_idle(self) -> bool:
        """True once sinfo reports the node (every node) idle; raises early if a daemon has died."""
        for daemon in self._daemons():
            if not pid_alive(read_pid(self._pid_file(daemon))):
                raise SlurmError(f"{daemon} died during startup\n{self._daemon_logs()}")
        out = self.run("sinfo", "-h", "-p", self.partition, "-n", str(self.node), "-o", "%T", check=False)
        return set(out.split()) == {"idle"}

    def _queue_snapshot(self) -> str:
        try:
            return "squeue -t all:\n" + self.run("squeue", "-t", "all", "-o", "%i %j %T %r %M %l", check=False)
        except (subprocess.SubprocessError, OSError) as err:
            return f"(squeue failed: {err})"

    def _daemon_logs(self, lines: int = 40) -> str:
        return "\n".join(f"--- last {lines} lines of {self._log_file(d)} ---\n{tail(self._log_file(d), lines)}"
                         for d in reversed(self._daemons()))


# -------------------------------------------------------------------- munge

def ensure_munged() -> bool:
    """Make sure a working munged serves /run/munge; return True when this call started it."""
    if munge_works():
        return False
    for directory in MUNGE_DIRS:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "munge", "munge")
    MUNGE_RUN_DIR.chmod(0o755)  # clients must reach the socket
    ensure_munge_key()
    # munged refuses to run with a key it does not own; run it as the munge user, as the
    # package's service does. It forks and returns once it is serving (or has failed).
    out = subprocess.run([which("munged")], user="munge", group="munge", extra_groups=[], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        raise SlurmError(f"munged exited {out.returncode}: {out.stderr}\n"
                         f"--- /var/log/munge/munged.log ---\n{tail(Path('/var/log/munge/munged.log'), 20)}")
    deadline = time.monotonic() + 10
    while not munge_works():
        if time.monotonic() > deadline:
            raise SlurmError("munged started but `munge -n | unmunge` fails")
        time.sleep(0.1)
    return True


def ensure_munge_key() -> None:
    """Create the munge key if missing: owned by munge, mode 0400, as munged demands."""
    if MUNGE_KEY.exists():
        return
    if which("mungekey"):
        subprocess.run([which("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"], check=True, capture_output=True)
    else:
        MUNGE_KEY.write_bytes(os.urandom(1024))
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)


def munge_works() -> bool:
    """True when a credential from `munge -n` decodes with `unmunge`."""
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (subprocess.SubprocessError, OSError):
        return False


# -------------------------------------------------------------------- processes and files

def node_hardware() -> dict[str, str]:
    """The node line of `slurmd -C` (NodeName, CPUs, Boards, ..., RealMemory) as a dict."""
    out = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=60).stdout
    hardware = dict(token.split("=", 1) for token in out.splitlines()[0].split())
    host = socket.gethostname().split(".")[0]
    if hardware.get("NodeName") != host:
        raise SlurmError(f"slurmd -C names the node {hardware.get('NodeName')!r}, but hostname -s is {host!r}")
    return hardware


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    """True while the process exists and is not a zombie (daemons are reaped by init, not us)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid_file(pid_file: Path, timeout: float = 30) -> None:
    """SIGTERM the process named in `pid_file`, SIGKILL it after `timeout`, wait until it is gone."""
    pid = read_pid(pid_file)
    if not pid_alive(pid):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
    raise SlurmError(f"process {pid} from {pid_file} survived SIGKILL")


def foreign_slurm_daemons() -> list[int]:
    """Pids of live slurmctld/slurmd/slurmstepd processes (another cluster that may need munged)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() in ("slurmctld", "slurmd", "slurmstepd") \
                        and pid_alive(int(proc.name)):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({err})"


# -------------------------------------------------------------------- pytest fixture

def session_cluster(tmp_path_factory, cluster_class: type, reason: str | None, name: str,
                    max_root: int = 60) -> Iterator:
    """The body of a session fixture: skip with `reason` if there is one, else start a `cluster_class` under
    a pytest temporary folder `name`, yield it, and stop it at the end of the session."""
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp(name)
    # slurmstepd's sockets live in the spool dir and Unix socket paths are limited to 107 bytes.
    cluster = cluster_class(root if len(str(root)) < max_root else None).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """One running SlurmCluster for the whole session; skips where the machine cannot run it."""
    yield from session_cluster(tmp_path_factory, SlurmCluster, slurm_unavailable_reason(), "slurm")

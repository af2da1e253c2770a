"""The launcher on a real two-node SLURM cluster (tests/slurm_multinode.py: two network namespaces, each
with its own host name, address and slurmd): one task per node, the rendezvous across hosts, a preemption
that requeues the whole job, and DeepSpeed ZeRO-2 across nodes. Submitted through
`python slurm/launch.py cluster=slurm cluster.nodes=2 ...`, as a user would."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_dense, read_json
from slurm_cluster import which
from slurm_multinode import two_node_cluster  # noqa: F401  (session fixture)
from test_slurm import _args, _done, _jobs, _logs, _reached_step, _same_search, _state, _submit, _wait

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_NODES = ["cluster.nodes=2", "cluster.tasks_per_node=1"]


def _starts_across_two_hosts(run_root, job_id: str) -> list[tuple[str, str]]:
    """(rank 0's host, rank 1's host) of each start of the job, read from each task's own log (submitit appends
    every start's output to the same <job>_<task>_log.out): each start printed the engine's `rank r/2 on
    <device> (... host h)` line and a rendezvous line naming rank 0's host, on two different hosts."""
    folder = run_root / "submitit" if (run_root / "submitit").exists() else run_root.parent / "submitit"
    logs = [(folder / f"{job_id}_{task}_log.out").read_text(errors="replace") for task in (0, 1)]
    hosts = [re.findall(rf"^rank {task}/2 on \S+ \(.*host (\S+)\)$", log, re.M) for task, log in enumerate(logs)]
    rendezvous = [re.findall(rf"^rank {task}/2 on 2 nodes: rendezvous tcp://([^:]+):\d+.*$", log, re.M)
                  for task, log in enumerate(logs)]
    starts = list(zip(*hosts))
    assert starts and len(hosts[0]) == len(hosts[1]), (hosts, logs[0][-2000:], logs[1][-2000:])
    for (rank0, rank1), *met in zip(starts, *rendezvous):
        assert rank0 != rank1 and met == [rank0, rank0], (starts, rendezvous)
    assert [len(r) for r in rendezvous] == [len(starts)] * 2, (starts, rendezvous)
    return starts


def test_two_node_search_preempted_mid_run_resumes_and_matches_the_two_process_local_run(
        two_node_cluster, dense_run, pass_search_2proc, tmp_path, beton_dir):
    """One task on each node; the search is preempted at step 4 or later by a whole-cluster job of the higher
    priority partition, requeued by SLURM, resumed exactly, and ends with the structure, top-1 and per-rank
    mask digests of the same search run by torchrun as two processes on one host."""
    runs = copy_dense(dense_run, tmp_path)
    run = runs / "r"
    _submit(two_node_cluster, [*_args(runs, beton_dir, "stage=search", "checkpoint.every_steps=3"), *TWO_NODES],
            step_delay=0.5)  # 20 steps: >= 10 s of training, so the preemption lands mid-search
    job_id = _jobs(run)[0]["job_id"]
    _wait(two_node_cluster, _reached_step(run, "search", 4), "two-node search step 4", run)
    # Every CPU of both nodes: SLURM must requeue the search to run it.
    two_node_cluster.sbatch("-p", two_node_cluster.preempt_partition, "-N", "2", "-c", str(two_node_cluster.cpus),
                            "--output=/dev/null", "--wrap", "sleep 3")
    _wait(two_node_cluster, _done(run, "search"), "the requeued two-node search's result", run)

    state = _state(run, "search")
    assert state["state"] == "completed" and state["starts"] == 2 and state["job_id"] == job_id, state
    assert state["tasks"] == 2 and state["nodes"] == 2, state
    requeue = next(h for h in state["history"] if h["state"] == "requeued")
    assert requeue["reason"].startswith("preemption") and requeue["step"] >= 4, state["history"]
    log = _logs(run, job_id)
    assert "for requeue" in log, log[-3000:]
    resumed = next(line for line in log.splitlines() if "resumed from" in line)
    assert f"(step {requeue['step']})" in resumed, resumed
    starts = _starts_across_two_hosts(run, job_id)
    assert len(starts) == 2 and all(set(s) == set(two_node_cluster.nodes) for s in starts), starts

    summary = read_json(run / "search/result/summary.json")
    assert summary["world_size"] == 2 and len(summary["mask_digest_per_rank"]) == 2, summary
    _same_search(pass_search_2proc.runs / "r", run)


def _losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "search/metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_deepspeed_zero2_search_runs_across_two_nodes_on_the_named_interface(two_node_cluster, dense_run,
                                                                              pass_search_2proc, tmp_path, beton_dir):
    """engine=deepspeed, ZeRO-2, one task per node, gloo pinned to eth0 by GLOO_SOCKET_IFNAME (as a cluster
    whose host names resolve to the wrong network would). Its losses are those of the DDP search on one host
    to within rounding (tests/test_deepspeed.py's tolerance: ZeRO-2 keeps parameters in one flat buffer)."""
    runs = copy_dense(dense_run, tmp_path)
    run = runs / "r"
    _submit(two_node_cluster, [*_args(runs, beton_dir, "stage=search", "engine=deepspeed", "engine.zero_stage=2"),
                               *TWO_NODES], GLOO_SOCKET_IFNAME="eth0")
    _wait(two_node_cluster, _done(run, "search"), "the two-node DeepSpeed search", run)

    state = _state(run, "search")
    assert state["state"] == "completed" and state["starts"] == 1 and state["nodes"] == 2, state
    log = _logs(run, state["job_id"])
    assert len(_starts_across_two_hosts(run, state["job_id"])) == 1
    assert log.count("sockets: GLOO_SOCKET_IFNAME=eth0") == 2, log[-3000:]
    losses, reference = _losses(run), _losses(pass_search_2proc.runs / "r")
    assert sorted(losses) == sorted(reference), (sorted(losses), sorted(reference))
    off = {s: (losses[s], reference[s]) for s in losses if not math.isclose(losses[s], reference[s], rel_tol=1e-4)}
    assert not off, f"steps whose loss differs from DDP's by more than 1e-4 (relative): {off}"


def test_where_namespaces_cannot_be_made_the_cluster_skips_with_the_reason():
    """What an unprivileged container gives: root without CAP_NET_ADMIN and CAP_SYS_ADMIN (dropped from the
    bounding set, so the probe's `ip` really fails). The fixture skips with this reason; no probe is left."""
    if os.geteuid() != 0 or which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop the capabilities")
    probe = "from slurm_multinode import two_node_unavailable_reason as reason; print(reason())"
    out = subprocess.run([which("setpriv"), "--bounding-set", "-sys_admin,-net_admin", sys.executable, "-c", probe],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("two-node SLURM cluster unavailable: network namespaces, veth pairs or bridges "
                                 "cannot be made here ("), out.stdout
    assert "Operation not permitted" in out.stdout, out.stdout
    assert "vpprobe" not in subprocess.run([which("ip"), "netns", "list"], capture_output=True, text=True).stdout

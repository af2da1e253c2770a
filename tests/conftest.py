"""Shared helpers and the session's shared runs.

Train once, assert many times: the session trains one dense network (`dense_run`), one PASS and one
VPNs `stage=all` (`pass_run`, `vpns_run`), one two-process PASS search (`pass_search_2proc`) and one
local sweep per baseline family (`structured_sweep`, `unstructured_sweep`); every test that only needs
"a finished run" reads those and never writes into them (copy first: `copy_dense`, `shutil.copytree`).
Errors are checked in-process (`run_main`); a few tests keep the real command line (`launch`).
docs/testing.md maps every former test to the one that holds its assertions now.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from filelock import FileLock

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture for the slurm-marked tests)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "slurm" / "launch.py"
SHARED_DATA = REPO.parent / "shared" / "data"

# A small synthetic problem that trains in seconds on 2 CPU cores.
TINY = ["data.synthetic_train_size=640", "data.synthetic_val_size=200", "data.synthetic_image_size=32",
        "data.res=32", "data.batch_size=64", "data.num_workers=1", "log.progress=false",
        "data.jit=false"]  # FFCV uncompiled: the same batches (test_data), without ~8 s of numba per loader


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small in-process ops: on the shared 2-core machine a
    second thread makes them many times slower. Use with pytest.mark.usefixtures("one_thread")."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# pytest-xdist (pyproject: -n 2) runs the suite on two workers. The tests of one group run on one worker, one
# after another: the SLURM tests share one cluster (a session fixture of the worker that runs them), the
# DeepSpeed tests their module's reference runs, and the readers of one shared run go together, so that the
# other worker trains something else instead of waiting for that run to be built. Every other test is a
# unit of its own. (xdist's own `--dist loadgroup` renames node ids, which pytest 9 ignores: the groups are
# made here.) xdist hands out the units with the most tests first, so each worker starts on a group; the rest
# follow in the order below, slow tests first. The SLURM group starts with the cluster's own tests, which
# need no trained network (the other worker trains `dense_run` meanwhile), then the time-limit test, which
# mostly waits on the scheduler.
XDIST_GROUPS = {
    "test_slurm.py": "slurm", "test_slurm_cluster.py": "slurm", "test_slurm_multinode.py": "slurm",
    "test_deepspeed.py": "deepspeed",
    "test_report.py": "report",                                               # test_report.py::sweep
    "test_vpns.py::test_unstructured_baselines": "unstructured",              # unstructured_sweep
    "test_pass.py::test_structured_baselines": "structured",                  # structured_sweep
    "test_launcher.py::test_local_sweep": "structured",
    "test_methods.py::test_golden_structured": "structured",
    "test_methods.py::test_golden_unstructured": "unstructured",
    "test_methods.py::test_golden_vpns": "vpns",
    "test_vpns.py::test_search_trains_only": "vpns",                          # vpns_run
    "test_vpns.py::test_finetune_keeps": "vpns",
    "test_vpns.py::test_export_loads": "vpns",
    "test_vpns.py::test_search_resumes_after_sigkill": "vpns",
}
FIRST_IN_GROUP = ("test_slurm_cluster.py::", "test_time_limit_requeues")


def _group(nodeid: str) -> str | None:
    path, _, name = nodeid.partition("::")
    file = path.rsplit("/", 1)[-1]
    return next((group for key, group in XDIST_GROUPS.items()
                 if key == file or ("::" in key and f"{file}::{name}".startswith(key))), None)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid) or nodeid

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    def rank(item):
        first = [i for i, key in enumerate(FIRST_IN_GROUP) if key in item.nodeid]
        return (_group(item.nodeid) is None, first[0] if first else len(FIRST_IN_GROUP),
                item.get_closest_marker("slow") is None)

    items.sort(key=rank)  # stable: file order within each rank


def shared_root(tmp_path_factory) -> Path:
    """The session's folder for what every pytest-xdist worker shares: the workers' common parent folder
    (each worker's own basetemp is <session>/popen-gwN), or this process's basetemp without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build) -> tuple[Path, str]:
    """`build(folder)` once per session, whichever worker asks first: the others wait on a file lock and
    read its folder and the stdout it returned. A failed build fails every test that asks for it, with
    the first failure's message, instead of being retried by each worker."""
    folder = shared_root(tmp_path_factory) / name
    stdout, failed = folder.with_name(f"{name}.stdout"), folder.with_name(f"{name}.failed")
    with FileLock(f"{folder}.lock"):
        if failed.exists():
            pytest.fail(f"the shared {name!r} failed (in another test):\n{failed.read_text()}")
        if not stdout.exists():
            folder.mkdir(parents=True, exist_ok=True)
            try:
                out = build(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {str(e)[-6000:]}")
                raise
            stdout.write_text(out or "")
    return folder, stdout.read_text()


@pytest.fixture(scope="session")
def beton_dir(tmp_path_factory) -> Path:
    """One beton cache for the whole session (all workers), so each dataset is written once."""
    folder = shared_root(tmp_path_factory) / "betons"
    folder.mkdir(exist_ok=True)
    return folder


# Seconds slept after every optimizer step where a test must land a kill, a signal, a cancel or a time
# limit mid-run: the step is then long on any machine, however fast (trainer/loop.py STEP_DELAY_ENV).
STEP_DELAY_ENV = "VP_PRUNE_TEST_STEP_DELAY_S"
STEP_DELAY_FRESH_ONLY_ENV = "VP_PRUNE_TEST_STEP_DELAY_FRESH_ONLY"  # only a run that did not resume sleeps


def child_env(threads: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def launch(args: list[str], *, timeout: float = 600, env=None, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run slurm/launch.py (optionally under torchrun with N processes) and capture its output."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               str(LAUNCH), *args]
    else:
        cmd = [sys.executable, str(LAUNCH), *args]
    return subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """The launcher's main(argv) in this process: (exit code, stdout, stderr). For errors, quick commands and
    runs whose command line is not what a test checks, where starting an interpreter (about 10 s of imports
    here) would only cost time; `launch` runs the real command line. One intra-op thread, as `child_env`
    gives a launched process: the same computation bit for bit as a launched run of the same command."""
    import torch

    from slurm.launch import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    except BaseException:
        print(out.getvalue()[-3000:], err.getvalue()[-3000:], sep="\n", file=sys.stderr)  # pytest shows it
        raise
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def launch_here(args: list[str]) -> subprocess.CompletedProcess:
    """`launch` in this process (run_main), for a run whose command line is not what the test checks."""
    code, out, err = run_main(args)
    return subprocess.CompletedProcess(args, code, out, err)


def run_here(argv: list[str]) -> str:
    """run_main that must succeed: its stdout."""
    code, out, err = run_main(argv)
    assert code == 0, out[-2000:] + err[-3000:]
    return out


def reached_step(metrics: Path, step: int) -> bool:
    """Whether a metrics.jsonl records `step` (or later) yet."""
    return metrics.exists() and any(json.loads(line)["step"] >= step
                                    for line in metrics.read_text().splitlines() if line.strip())


def run_and_kill_at_step(args: list[str], metrics: Path, step: int, timeout: float = 300,
                         delay: float = 0.3) -> None:
    """Start the launcher and SIGKILL it once `metrics` (a metrics.jsonl) records `step`. Every step sleeps
    `delay` seconds after it is logged, so the kill lands before the next one on any machine."""
    proc = subprocess.Popen([sys.executable, str(LAUNCH), *args], cwd=REPO, env=child_env(**{STEP_DELAY_ENV: str(delay)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if reached_step(metrics, step):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_image_folder(root: Path, per_class: int, num_classes: int = 3, size: int = 32, seed: int = 0) -> Path:
    """A small real ImageFolder tree of PNG files made from the synthetic generator."""
    from PIL import Image

    from trainer.data.synthetic import SyntheticImages

    images = SyntheticImages(per_class * num_classes, size, num_classes, seed)
    for i in range(len(images)):
        image, label = images[i]
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


def train_dense(runs: Path, args: list[str]) -> str:
    """Run stage=dense (2 epochs) once into `runs` (run 'r'); tests then copy it with copy_dense."""
    return run_here([*args, "stage=dense", "dense.epochs=2"])


# The session's dense network: every test that prunes "a trained dense network" copies this one.
# The dense stage does not depend on the method (no method file sets a dense.* key), so one serves
# PASS, VPNs, the baselines, DeepSpeed and SLURM alike. Logged every step: tests/test_training.py
# compares a killed-and-resumed dense run with it record by record.
DENSE_ARGS = ["method=pass", "run=r", *TINY, "log.every_steps=1"]


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, beton_dir) -> Path:
    """A runs directory whose run 'r' holds the finished dense stage (2 epochs of TINY)."""
    runs, _ = build_once(tmp_path_factory, "dense",
                         lambda runs: train_dense(runs, [f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *DENSE_ARGS]))
    return runs


def copy_dense(dense_runs: Path, tmp_path: Path) -> Path:
    """A new runs directory whose run 'r' has only the finished dense stage (any method may continue it)."""
    shutil.copytree(dense_runs / "r" / "dense", tmp_path / "runs" / "r" / "dense")
    return tmp_path / "runs"


# The PASS and VPNs settings the shared runs and the tests that compare with them use: few images, short
# stages, a high search lr so the masks move within a few steps (10 steps per epoch at batch 64).
PASS_SEARCH = ["search.epochs=2", "search.lr=0.01", "pass.prompt_lr=0.01", "finetune.epochs=1"]
VPNS_SEARCH = ["search.epochs=2", "search.lr=0.01", "finetune.epochs=1", "pruning.density=0.1"]


def pass_args(runs, beton_dir, *extra, method: str = "pass") -> list[str]:
    return [f"method={method}", "run=r", f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *TINY, *PASS_SEARCH,
            *extra]


def vpns_args(runs, beton_dir, *extra, method: str = "vpns") -> list[str]:
    return [f"method={method}", "run=r", f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *TINY, *VPNS_SEARCH,
            *extra]


@dataclass
class SharedRun:
    runs: Path          # the runs directory; the run is runs/r (a sweep: runs/sw/<point>)
    stdout: str         # what the launcher printed
    args: list[str] = field(default_factory=list)   # the command line (a sweep's, to relaunch it)

    @property
    def run(self) -> Path:
        return self.runs / "r"


def _launched(args: list[str], **kwargs) -> str:
    out = launch(args, **kwargs)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _shared_from_dense(tmp_path_factory, dense_run: Path, name: str, make_args, *, torchrun: int = 0) -> SharedRun:
    """A session-wide run that continues a copy of the shared dense network: `make_args(runs)` is its
    command line, run in-process (or under torchrun with `torchrun` processes)."""
    def build(folder: Path) -> str:
        runs = copy_dense(dense_run, folder)
        if torchrun:
            return _launched(make_args(runs), torchrun=torchrun, timeout=900)
        return run_here(make_args(runs))
    folder, stdout = build_once(tmp_path_factory, name, build)
    return SharedRun(folder / "runs", stdout, make_args(folder / "runs"))


@pytest.fixture(scope="session")
def pass_run(dense_run, tmp_path_factory, beton_dir) -> SharedRun:
    """PASS stage=all on the shared dense network, logged every step, checkpointed every 3 steps. The
    reference that killed, signalled, preempted and SLURM searches of the same settings must reproduce."""
    return _shared_from_dense(tmp_path_factory, dense_run, "pass", lambda runs: pass_args(
        runs, beton_dir, "stage=all", "log.every_steps=1", "checkpoint.every_steps=3"))


@pytest.fixture(scope="session")
def pass_search_2proc(dense_run, tmp_path_factory, beton_dir) -> SharedRun:
    """The PASS search of `pass_run`'s settings on two processes (torchrun, gloo)."""
    return _shared_from_dense(tmp_path_factory, dense_run, "pass2", lambda runs: pass_args(
        runs, beton_dir, "stage=search", "log.every_steps=1"), torchrun=2)


@pytest.fixture(scope="session")
def vpns_run(dense_run, tmp_path_factory, beton_dir) -> SharedRun:
    """VPNs stage=all on the shared dense network; a finetune of 2 epochs keeping a checkpoint every 4 steps."""
    return _shared_from_dense(tmp_path_factory, dense_run, "vpns", lambda runs: vpns_args(
        runs, beton_dir, "stage=all", "finetune.epochs=2", "checkpoint.every_steps=4", "checkpoint.keep=20"))


def _baseline_sweep(tmp_path_factory, name: str, dense_run: Path, beton_dir, make_args, methods: str,
                    *extra) -> SharedRun:
    """One local stage=all sweep (in-process) over baseline methods, pruning the shared dense network's weights."""
    weights = dense_run / "r" / "dense" / "result" / "model.pt"

    def sweep_args(root: Path) -> list[str]:
        args = ["-m", f"method={methods}", *make_args(root, beton_dir, "stage=all", f"model.weights={weights}", *extra)]
        return [a for a in args if a != "run=r"] + ["run=sw"]
    root, stdout = build_once(tmp_path_factory, name, lambda root: run_here(sweep_args(root)))
    return SharedRun(root, stdout, sweep_args(root))


@pytest.fixture(scope="session")
def structured_sweep(dense_run, tmp_path_factory, beton_dir) -> SharedRun:
    """l1, random and uniform at 40% of the FLOPs: runs/sw/method-<m>/ (and the command, in `args`)."""
    return _baseline_sweep(tmp_path_factory, "structured", dense_run, beton_dir, pass_args,
                           "l1,random,uniform", "pruning.flops_ratio=0.4")


@pytest.fixture(scope="session")
def unstructured_sweep(dense_run, tmp_path_factory, beton_dir) -> SharedRun:
    """omp, hydra and random_unstructured at density 0.3: runs/sw/method-<m>/."""
    return _baseline_sweep(tmp_path_factory, "unstructured", dense_run, beton_dir, vpns_args,
                           "omp,hydra,random_unstructured", "pruning.density=0.3")

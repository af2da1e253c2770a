"""Shared helpers: run the real launcher in subprocesses on small, fast settings."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture for the slurm-marked tests)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "slurm" / "launch.py"
SHARED_DATA = REPO.parent / "shared" / "data"

# A small synthetic problem that trains in seconds on 2 CPU cores.
TINY = ["data.synthetic_train_size=640", "data.synthetic_val_size=200", "data.synthetic_image_size=32",
        "data.res=32", "data.batch_size=64", "data.num_workers=1", "log.progress=false"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small in-process ops: on the shared 2-core machine a
    second thread makes them many times slower. Use with pytest.mark.usefixtures("one_thread")."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def beton_dir(tmp_path_factory) -> Path:
    """One beton cache for the whole session, so each dataset is written once."""
    return tmp_path_factory.mktemp("betons")


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


def run_and_kill_at_step(args: list[str], metrics: Path, step: int, timeout: float = 300) -> None:
    """Start the launcher and SIGKILL it once `metrics` (a metrics.jsonl) records `step`."""
    proc = subprocess.Popen([sys.executable, str(LAUNCH), *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
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


def train_dense(runs: Path, args: list[str]) -> Path:
    """Run stage=dense once into `runs` (run 'r'); tests then copy it with copy_dense."""
    out = launch([*args, "stage=dense", "dense.epochs=2"])
    assert out.returncode == 0, out.stderr[-2000:]
    return runs


def copy_dense(dense_runs: Path, tmp_path: Path) -> Path:
    """A new runs directory whose run 'r' has only the finished dense stage (any method may continue it)."""
    shutil.copytree(dense_runs / "r" / "dense", tmp_path / "runs" / "r" / "dense")
    return tmp_path / "runs"

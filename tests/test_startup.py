"""Cheap start-up: `stage=status` and relaunching a finished run answer without importing the training code.

Each command runs in a subprocess, on the real command line's code path (slurm/launch.py's main, as its
`__main__` block calls it), and reports which top-level packages it imported. The finished run is written
by hand, as the run directory contract (trainer/run_dir.py) describes it: config.yaml and each stage's
result/summary.json; nothing is trained.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.run_dir import RunDir, write_json

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "slurm" / "launch.py"
HEAVY = ("torch", "ffcv", "torchvision", "torch_pruning", "deepspeed", "numba", "matplotlib")
MODULES = "imported top-level modules: "

# slurm/launch.py's `__main__` block, plus a last line naming the top-level packages the command imported.
PROBE = f"""
import runpy, sys
launcher = runpy.run_path({str(LAUNCH)!r})
code = launcher["main"](sys.argv[1:])
print({MODULES!r} + " ".join(sorted({{m.split(".")[0] for m in sys.modules}})), flush=True)
sys.exit(code)
"""


def run_probe(argv: list[str], **env_extra) -> tuple[int, str, set[str]]:
    """(exit code, the command's stdout, top-level modules it imported) of `python slurm/launch.py *argv`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", **env_extra)
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    out, _, modules = proc.stdout.rpartition(MODULES)
    assert modules, f"no module list (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, out, set(modules.split())


def finished_run(runs: Path, tokens: list[str], stages: list[str], top1: float = 61.25) -> RunDir:
    """Run 'r' under `runs` as a finished run of `tokens` leaves it: config.yaml and every stage's summary."""
    cfg = load_config([*tokens, "run=r", f"runs_dir={runs}"])
    run = RunDir(runs, "r")
    run.write_config(cfg)
    for stage in stages:
        run.result(stage).mkdir(parents=True)
        write_json(run.result(stage) / "summary.json", {"top1": top1, "top5": 90.0, "params": 1e6, "flops": 1e8})
    return run


@pytest.fixture
def finished_dense(tmp_path) -> RunDir:
    return finished_run(tmp_path / "runs", ["method=dense"], ["dense", "eval"])


def note(run: RunDir, stages: str) -> str:
    """What the runner (trainer/stages/runner.py) says when a relaunched run has nothing left to do."""
    return (f"run 'r' is finished ({stages} done); nothing to do. Results: {run.root}; "
            f"stage=eval evaluates again, resume=never starts a new run\n")


def test_relaunching_a_finished_run_imports_no_training_code(finished_dense):
    code, out, modules = run_probe(["stage=all", "method=dense", "run=r", f"runs_dir={finished_dense.root.parent}"])
    assert code == 0 and out == note(finished_dense, "dense, eval"), out
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_a_finished_pruning_run_relaunched_under_torchrun_speaks_once(tmp_path):
    run = finished_run(tmp_path / "runs", ["method=pass"], ["dense", "search", "finetune", "eval"])
    args = ["method=pass", "run=r", f"runs_dir={run.root.parent}"]
    code, out, modules = run_probe(args, RANK="0", WORLD_SIZE="2")
    assert code == 0 and out == note(run, "dense, search, finetune, eval"), out
    code, out, modules = run_probe(args, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")  # not the main process
    assert code == 0 and out == "", out
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.parametrize("argv, code, text", [
    (["--help"], 0, "cluster"),
    (["dense.epoch=3"], 2, "error: "),          # a misspelled key: one line, before any work
    (["print_config=true"], 0, "model:"),
])
def test_help_a_config_error_and_print_config_import_no_training_code(argv, code, text):
    """They answer from the config alone (benchmarks/startup.py times them); tests/test_config.py checks the texts."""
    got, out, modules = run_probe(argv)
    assert got == code and (text in out or code == 2), out
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_status_of_a_finished_run_imports_no_training_code(finished_dense):
    code, out, modules = run_probe(["stage=status", "run=r", f"runs_dir={finished_dense.root.parent}"])
    assert code == 0 and out == (f"run 'r' ({finished_dense.root})\n"
                                 f"  dense     done         top-1 61.25%\n"
                                 f"  eval      done         top-1 61.25%\n"), out
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_status_of_an_interrupted_run_finds_its_checkpoint_without_torch(tmp_path):
    run = finished_run(tmp_path / "runs", ["method=dense"], [])
    (run.stage("dense") / "checkpoints").mkdir(parents=True)
    (run.stage("dense") / "checkpoints" / "last.pt").write_bytes(b"")
    code, out, modules = run_probe(["stage=status", "run=r", f"runs_dir={run.root.parent}"])
    assert code == 0 and out == (f"run 'r' ({run.root})\n"
                                 f"  dense     interrupted  has a checkpoint; relaunch the same command to resume\n"), out
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_the_launcher_leaves_unfinished_runs_and_explicit_requests_to_the_runner(tmp_path):
    from slurm.launch import _finished_note

    run = finished_run(tmp_path / "runs", ["method=dense"], ["dense", "eval"])

    def cfg(*tokens):
        return load_config(["method=dense", "run=r", f"runs_dir={run.root.parent}", *tokens])

    assert _finished_note(cfg()) == note(run, "dense, eval").rstrip("\n")
    assert _finished_note(cfg("stage=dense")) == run.finished_note(["dense"], "nothing to do")
    assert _finished_note(cfg("stage=eval")) is None  # an explicit eval always runs
    assert _finished_note(cfg("resume=never")) is None  # a new, timestamped run
    assert _finished_note(cfg("stage=search")) is None  # method=dense has no search stage: the runner says so
    (run.result("eval") / "summary.json").unlink()
    assert _finished_note(cfg()) is None  # eval still to run
    write_json(run.result("eval") / "summary.json", {"top1": 1.0})
    (run.root / "config.yaml").unlink()
    assert _finished_note(cfg()) is None  # the runner writes config.yaml first


@pytest.mark.parametrize("files", [
    [],
    ["last.pt"],
    ["last.pt", "prev-000000010.pt", "prev-000000020.pt"],
    ["prev-000000010.pt", "prev-000000020.pt"],
    ["step-000000010/complete.json", "step-000000030/x", "step-000000020/complete.json",
     "step-000000040-universal/complete.json"],
    ["step-000000030/x"],
    None,  # no checkpoints folder at all
])
def test_the_newest_checkpoint_by_file_names_is_the_one_a_resume_tries_first(tmp_path, files):
    """RunDir.newest_checkpoint (torch-free, for stage=status) agrees with the stores a resume uses."""
    from trainer.checkpoint import CheckpointStore
    from trainer.engines.ds_checkpoint import complete_tags

    run = RunDir(tmp_path, "r")
    directory = run.stage("dense") / "checkpoints"
    for name in files or []:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps({}))
    if files is not None:
        directory.mkdir(parents=True, exist_ok=True)
    expected = CheckpointStore(directory).newest() or next(iter(complete_tags(directory)), None)
    assert run.newest_checkpoint("dense") == expected

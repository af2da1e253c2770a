#!/usr/bin/env python
"""Entry point: `python slurm/launch.py [-m] [key=value ...]` (see --help).

Reads the config and checks it completely before any work, then:
  cluster=local   runs the requested stages here (under torchrun for several processes);
  cluster=slurm   submits them as SLURM jobs through submitit (slurm/submit.py);
  cluster=debug   runs those same job objects in this process.
`-m` sweeps: every combination of the comma-separated values (slurm/sweep.py).
`experiment=<name>` runs a recipe of configs/experiment/ (trainer/config/experiment.py): all of its points,
one of them, or a sweep of it.
`stage=status|cancel run=<run or sweep>` reports on or cancels submitted jobs;
`stage=report run=<run or sweep>` writes <run or sweep>/report/report.md and its plots.
"""
from __future__ import annotations

import errno
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SWEEP_FLAGS = ("-m", "--multirun")


def _job_command(tokens: list[str]) -> tuple[str, str, str] | None:
    """(command, runs_dir, name) for stage=status|cancel|report; these read a run, they do not compose one."""
    from trainer.config.load import parse_overrides
    from trainer.config.schema import JOB_COMMANDS, RootConfig

    given = dict(parse_overrides(tokens))
    if given.get("stage") not in JOB_COMMANDS:
        return None
    from trainer.config import ConfigError
    if not given.get("run"):
        raise ConfigError(f"stage={given['stage']} needs run=<run or sweep name>")
    return given["stage"], given.get("runs_dir", RootConfig.runs_dir), given["run"]


def _finished_note(cfg) -> str | None:
    """What run_stages would say about a local run whose planned stages are all done (None: it has work).

    Decided from the run directory alone, so that relaunching a finished run costs no torch/FFCV import;
    whenever this is None the runner decides (and keeps its own check for its other callers).
    """
    from trainer.plan import plan, pruning_method_problem
    from trainer.run_dir import RunDir

    if cfg.resume == "never":  # starts a new run
        return None
    stages = plan(cfg)
    if any(stage in ("search", "finetune") and pruning_method_problem(cfg.method.name, stage) for stage in stages):
        return None  # the runner raises StageNotImplemented
    run = RunDir(cfg.runs_dir, cfg.run)
    if not (run.root / "config.yaml").exists() or not run.nothing_to_do(cfg.stage, stages):
        return None  # the runner writes config.yaml / has stages to run
    return run.finished_note(stages, "nothing to do")


def _run_here(cfg) -> None:
    from trainer.distributed import detect_env  # torch-free; the runner's engine.is_main is the same rank test

    main = detect_env().rank == 0  # under torchrun or srun, the main process speaks (and locks) for all
    note = _finished_note(cfg)
    if note is not None:
        if main:
            print(note, flush=True)
        return
    with _one_writer(cfg, main):
        from trainer.stages import run_stages
        run_stages(cfg)


def _one_writer(cfg, main: bool, root: Path | None = None, what: str = "run"):
    """The run's lock (trainer/run_lock.py), taken by the main process before torch is imported; a fresh
    run (resume=never) gets a new timestamped directory of its own and needs none."""
    import contextlib

    if not main or cfg.resume == "never":
        return contextlib.nullcontext()
    from trainer.run_lock import run_lock
    return run_lock(root or Path(cfg.runs_dir).expanduser() / cfg.run, what)


def _user_errors() -> tuple:
    """Exceptions that mean bad input or state, printed as one line (imported late: they pull in torch)."""
    from slurm.status import StatusError
    from slurm.submit import SubmitError
    from trainer.data import DataError
    from trainer.models import ModelError
    from trainer.report import ReportError
    from trainer.stages import StageNotImplemented

    return (StageNotImplemented, DataError, ModelError, FileNotFoundError, ValueError, SubmitError, StatusError,
            ReportError)


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from trainer.config import ConfigError, help_text, load_config, validate_config
    from trainer.run_lock import RunLocked

    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    sweep = any(a in SWEEP_FLAGS for a in argv)
    tokens = [a for a in argv if a not in SWEEP_FLAGS]
    try:
        from trainer.config.experiment import expand_experiment
        tokens, sweep = expand_experiment(tokens, sweep)
        command = _job_command(tokens)
        if command:
            what, runs_dir, name = command
            if what == "report":
                from trainer.report import report_command
                return report_command(runs_dir, name)
            from slurm.status import cancel, show_status
            return (show_status if what == "status" else cancel)(runs_dir, name)
        if sweep:
            return _sweep(tokens)
        cfg = load_config(tokens)
        validate_config(cfg)
        if cfg.print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        if cfg.cluster.name == "local":
            _run_here(cfg)
        else:
            from slurm.submit import submit_run
            submit_run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunLocked as e:  # before _user_errors(): a second launch answers without importing torch
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; relaunch the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk is the user's to fix
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, _user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


def _sweep(tokens: list[str]) -> int:
    from slurm.submit import submit_sweep
    from slurm.sweep import expand, write_sweep_file

    root, base, points, listing, shared = expand(tokens)
    if base.print_config:
        print("\n".join([f"{d.run}: shared dense run" for d in shared]
                        + [f"{p['run']}: {p['overrides']}" + (f" (prunes {p['dense_run']})" if p.get("dense_run") else "")
                           for p in listing]))
        return 0
    if base.cluster.name != "local":
        write_sweep_file(root, base, listing, tokens, shared)
        _say_sweep(root, points, shared)
        submit_sweep(points, root, base, shared=shared)
        print(f"follow with: python slurm/launch.py stage=status run={root.name}")
        return 0
    from trainer.distributed import detect_env
    main = detect_env().rank == 0  # under torchrun every rank walks the sweep; the main one speaks and writes
    with _one_writer(base, main, root, "sweep"):  # before sweep.json is written again
        if main:
            write_sweep_file(root, base, listing, tokens, shared)
            _say_sweep(root, points, shared)
        say = print if main else (lambda *a, **k: None)
        for cfg in shared:
            say(f"== shared dense run: {cfg.run}", flush=True)
            _run_here(cfg)
        for i, cfg in enumerate(points, 1):
            say(f"== point {i}/{len(points)}: {cfg.run}", flush=True)
            _run_here(cfg)
    return 0


def _say_sweep(root: Path, points: list, shared: list) -> None:
    print(f"sweep '{root.name}': {len(points)} points in {root}"
          + (f", pruning {len(shared)} shared dense run(s): {', '.join(d.run for d in shared)}" if shared else ""))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

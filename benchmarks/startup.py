#!/usr/bin/env python
"""Start-up time of the launcher's quick commands: wall clock of the whole `python slurm/launch.py ...` process.

    python benchmarks/startup.py [--repeats 5] [--warmup 1] [--baseline DIR] [--out startup.json]

Timed, each as a fresh interpreter (subprocess, this Python), from the
repository root:

  help            python slurm/launch.py --help
  typo            python slurm/launch.py cluster.nodez=2          (a one-line "did you mean" error, exit 2)
  print_config    python slurm/launch.py print_config=true
  status          python slurm/launch.py stage=status run=r       (a finished run: a table of done stages)
  relaunch        python slurm/launch.py stage=all method=dense run=r
                                                                  (the same command again: "nothing to do")

The finished run is written by hand, as trainer/run_dir.py describes a run
directory (config.yaml and each stage's result/summary.json; nothing is
trained), in a temporary runs_dir that every command is pointed at
(runs_dir=...), so that no command reads or writes ./runs.

--baseline DIR times the same commands with DIR/slurm/launch.py from DIR (another
checkout, e.g. `git worktree add /tmp/startup-base HEAD`; the launcher puts its
own checkout first on sys.path), side by side with this checkout: in every
round each command runs once per checkout, in turns (order alternated every
round), so load from other processes hits both alike. --warmup rounds are run
untimed first (file cache). Each command's exit code and output are checked,
so a command that failed is never timed as a fast one. The median over the
rounds is reported, with the fastest and slowest, and which of the heavy
packages (torch, FFCV, torchvision, Torch-Pruning, DeepSpeed) the command
imported (from a separate, untimed `-X importtime` run).

Prints a table and writes JSON (--out) with the machine, date and versions.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, argument_parser, load_average, machine_info, parse_args, write_report  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.run_dir import RunDir, write_json  # noqa: E402

HEAVY = ("torch", "ffcv", "torchvision", "torch_pruning", "deepspeed")
NOTHING_TO_DO = "is finished (dense, eval done); nothing to do"


def commands(runs: Path, empty: Path) -> list[tuple[str, list[str], int, str]]:
    """(name, arguments, expected exit code, text its output must contain)."""
    return [
        ("help", ["--help"], 0, "stage="),
        ("typo", ["cluster.nodez=2", f"runs_dir={empty}"], 2, "did you mean 'cluster.nodes'"),
        ("print_config", ["print_config=true", f"runs_dir={empty}"], 0, "runs_dir:"),
        ("status", ["stage=status", "run=r", f"runs_dir={runs}"], 0, "  eval      done"),
        ("relaunch", ["stage=all", "method=dense", "run=r", f"runs_dir={runs}"], 0, NOTHING_TO_DO),
    ]


def finished_run(runs: Path) -> None:
    """Run 'r' as a finished `method=dense` run leaves it: config.yaml, dense and eval summaries."""
    cfg = load_config(["method=dense", "run=r", f"runs_dir={runs}"])
    run = RunDir(runs, "r")
    run.write_config(cfg)
    for stage in ("dense", "eval"):
        run.result(stage).mkdir(parents=True)
        write_json(run.result(stage) / "summary.json", {"top1": 50.0, "top5": 90.0})


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_once(root: Path, args: list[str], code: int, expect: str, importtime: bool = False):
    """Seconds of one launcher process (checked), or with importtime its heavy top-level imports."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), str(root / "slurm" / "launch.py"), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=child_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != code or expect not in output:
        raise SystemExit(f"{' '.join(cmd)} (in {root}): exit {proc.returncode}, expected {code} and {expect!r}:\n"
                         f"{output[-2000:]}")
    if importtime:
        names = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        return [m for m in HEAVY if m in names]
    return seconds


def print_table(results: dict, sides: list[str], args) -> list[str]:
    lines = [f"wall clock of `python slurm/launch.py ...` (fresh process), median of {args.repeats} rounds "
             f"(after {args.warmup} warm-up){', in turns with the baseline' if len(sides) > 1 else ''}; "
             f"[min-max]"]
    header = f"{'command':<14}" + "".join(f"{side + ' s':>22}" for side in sides)
    header += f"{'speedup':>9}" if len(sides) > 1 else ""
    lines.append(header + "   heavy imports" + (" (before -> after)" if len(sides) > 1 else ""))
    for name, per_side in results.items():
        row = f"{name:<14}"
        for side in sides:
            r = per_side[side]
            row += f"{r['median_s']:>8.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}]".rjust(22)
        if len(sides) > 1:
            row += f"{per_side[sides[0]]['median_s'] / per_side[sides[1]]['median_s']:>8.1f}x"
        row += "   " + " -> ".join(",".join(per_side[side]["heavy_imports"]) or "none" for side in sides)
        lines.append(row)
    print("\n".join(lines))
    return lines


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout to time side by side (e.g. a `git worktree` of the previous commit)")
    args = parse_args(parser, "startup")
    info = machine_info()
    started = time.time()
    print(f"{info['cpu_model']}, {info['cpu_count']} cores, Python {info['python']}, {info['date']}, "
          f"load average {info['load_average_start']}")
    roots = ([("before", args.baseline.resolve())] if args.baseline else []) + [("after" if args.baseline else "this",
                                                                               ROOT)]
    sides = [side for side, _ in roots]
    with tempfile.TemporaryDirectory() as tmp:
        runs, empty = Path(tmp) / "runs", Path(tmp) / "empty"
        empty.mkdir()
        finished_run(runs)
        cmds = commands(runs, empty)
        times = {name: {side: [] for side in sides} for name, *_ in cmds}
        for r in range(args.warmup + args.repeats):
            print(f"  round {r + 1}/{args.warmup + args.repeats}", flush=True)
            order = roots if r % 2 == 0 else roots[::-1]
            for name, argv, code, expect in cmds:
                for side, root in order:
                    seconds = run_once(root, argv, code, expect)
                    if r >= args.warmup:
                        times[name][side].append(seconds)
        heavy = {name: {side: run_once(root, argv, code, expect, importtime=True) for side, root in roots}
                 for name, argv, code, expect in cmds}
    results = {name: {side: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "raw_s": t,
                             "heavy_imports": heavy[name][side]}
                      for side, t in per_side.items()}
               for name, per_side in times.items()}
    table = print_table(results, sides, args)
    info.update(load_average_end=load_average(), wall_seconds=time.time() - started)
    print(f"load average at the end {info['load_average_end']}, {info['wall_seconds']:.0f} s in all")
    report = {"benchmark": "startup", **info, "repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
              "commands": {name: " ".join(["python slurm/launch.py", *argv])
                           for name, argv, *_ in commands(Path("<runs>"), Path("<empty>"))},
              "baseline": str(args.baseline) if args.baseline else None, "table": table, "results": results}
    write_report(args.out, report)


if __name__ == "__main__":
    main()

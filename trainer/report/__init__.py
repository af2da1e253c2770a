"""`stage=report run=<run or sweep>`: <root>/report/report.md with a row per run, and its PNG plots.

Written at the end of every `stage=all` run (and so, point by point, for a sweep) and on demand.
Reads only the run directories' JSON files: no torch, no GPU, seconds.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import plots
from ..run_dir import SWEEP_FILE
from .collect import ReportError, Row, collect, report_runs
from .table import markdown

REPORT_DIR = "report"
REPORT_FILE = "report.md"


def _plots_for(rows: list[Row], directory: Path, suffix: str, what: str) -> list[tuple[str, str]]:
    dense = [r for r in rows if r.kind == "dense"]
    pruned = [r for r in rows if r.kind == "pruned"]
    made = [
        (f"Accuracy vs FLOPs{what}", plots.accuracy_vs(
            pruned, dense, directory / f"accuracy_vs_flops{suffix}.png", x="flops_ratio",
            title=f"Top-1 vs FLOPs kept{what}", xlabel="FLOPs kept (% of the dense network's multiply-accumulates)")),
        (f"Accuracy vs density (unstructured methods){what}", plots.accuracy_vs(
            [r for r in pruned if r.unstructured], dense, directory / f"accuracy_vs_density{suffix}.png", x="density",
            title=f"Top-1 vs weight density{what}", xlabel="weights kept (% of the scored weights)")),
        (f"Kept width per layer (structured runs){what}", plots.per_layer(
            pruned, directory / f"kept_width{suffix}.png", attr="kept_widths",
            title=f"Kept output channels per layer{what}", ylabel="channels kept (% of the layer's width)")),
        (f"Density per layer (unstructured runs){what}", plots.per_layer(
            pruned, directory / f"density_per_layer{suffix}.png", attr="density_per_layer",
            title=f"Weight density per layer{what}", ylabel="weights kept (% of the layer's weights)")),
        (f"Training curves{what}", plots.training_curves(rows, dense, directory / f"training_curves{suffix}.png")),
    ]
    return [(caption, path.name) for caption, path in made if path is not None]


def write_report(root: Path) -> Path:
    """Write <root>/report/ for a run or a sweep; returns report.md. Replaced whole, never half-written."""
    root = Path(root).expanduser()
    rows = collect(root)
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.data), []).append(row)
    tmp = root / f".{REPORT_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    made = []
    for (model, data), group in groups.items():
        made += _plots_for(group, tmp, f"_{model}_{data}" if len(groups) > 1 else "", f" ({model} on {data})")
    from .seeds import seeds_markdown  # here, so `python -m trainer.report.seeds` finds it not yet imported
    seeds = seeds_markdown([root]) if (root / SWEEP_FILE).exists() else []
    (tmp / REPORT_FILE).write_text(markdown(root.name, rows, made, str(root), seeds))
    final = root / REPORT_DIR
    old = root / f".{REPORT_DIR}.{os.getpid()}.old"
    if final.exists():
        os.replace(final, old)  # two sweep points finishing together: the later one's report wins whole
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final / REPORT_FILE


def report_command(runs_dir: str, name: str, say=print) -> int:
    """`stage=report run=<name>`."""
    root = Path(runs_dir).expanduser() / name
    if not root.exists():
        raise ReportError(f"no run or sweep '{name}' in {Path(runs_dir).expanduser()}")
    path = write_report(root)
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    say(f"report: {path} ({len(report_runs(root))} run(s); plots: {', '.join(pngs) or 'none'})")
    return 0


__all__ = ["ReportError", "write_report", "report_command", "REPORT_DIR", "REPORT_FILE"]

"""report.md: one table row per run, then the plots."""
from __future__ import annotations

import time

from .collect import Row

COLUMNS = ("run", "method", "model", "data", "budget", "achieved", "params (M)", "top-1 % (prompt)",
           "top-1 % (no prompt)", "top-5 %", "latency ms (dense ms)", "speedup", "wall min")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _budget(row: Row) -> str:
    if row.kind == "dense" or row.budget is None:
        return "—"
    return f"FLOPs {row.budget:g}" if row.structured else f"density {row.budget:g}"


def _achieved(row: Row) -> str:
    if row.kind == "dense":
        return "FLOPs 1"
    if row.unstructured:
        text = "—" if row.density is None else f"density {row.density:.3f}"
        if row.flops_ratio is not None:
            text += f" (FLOPs {row.flops_ratio:.3f}*)"
        return text
    return "—" if row.flops_ratio is None else f"FLOPs {row.flops_ratio:.3f}"


def _latency(row: Row) -> tuple[str, str]:
    lat = row.latency
    if not lat:
        return "—", "—"
    return (f"{lat['pruned_ms']:.1f} ({lat['dense_ms']:.1f}) @b{lat['batch']} {lat.get('device', 'cpu')}",
            f"{lat['speedup']:.2f}x")


def cells(row: Row) -> list[str]:
    latency, speedup = _latency(row)
    return [row.run, row.method, row.model, row.data, _budget(row), _achieved(row),
            "—" if row.params is None else f"{row.params / 1e6:.2f}", _pct(row.top1_prompt), _pct(row.top1_no_prompt),
            _pct(row.top5), latency, speedup, f"{row.wall_seconds / 60:.1f}"]


def markdown(title: str, rows: list[Row], plots: list[tuple[str, str]], source: str,
             sections: list[str] = ()) -> str:
    """`sections`: more markdown lines after the table's notes (the sweep's seed statistics)."""
    lines = [f"# Report: {title}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{source}` "
             "(regenerate: `python slurm/launch.py stage=report run=<run or sweep>`).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    lines += ["",
              "- FLOPs are multiply-accumulates per image at the run's resolution, as a fraction of the dense network's.",
              "- *Unstructured methods: the FLOPs a sparse kernel would need if every masked weight were skipped; "
              "on dense hardware they run at the dense cost, so they have no measured speedup.",
              "- Accuracy is on the validation split, from the eval stage where it ran, else from the last training "
              "stage. `prompt`: with the learned visual prompt; `no prompt`: the same network without it.",
              "- Latency: median CPU forward time of the pruned backbone next to its dense twin, measured side by "
              "side at the end of finetune.",
              "- Wall time counts each run's own stages; sweep points prune a shared dense network, whose training "
              "time is in its own row."]
    if sections:
        lines += ["", *sections]
    if plots:
        lines += ["", "## Plots", ""]
        for caption, file in plots:
            lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"

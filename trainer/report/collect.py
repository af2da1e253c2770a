"""Gather what a report shows from run directories: one row per run, from its summaries, config and metrics.

A run contributes a dense row if it trained its own dense network (or is a
sweep's shared dense run), and a pruned row if it has a search or finetune
result. Accuracy comes from the newest of eval, finetune, search: eval is the
last word (it may use a held-out `data.val_dir`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pruning.methods import STRUCTURED, UNSTRUCTURED, family_of

from ..run_dir import SWEEP_FILE, RunDir
TRAINING_STAGES = ("dense", "search", "finetune")


class ReportError(ValueError):
    """A run or file the report cannot use (one-line message naming it)."""


@dataclass
class Row:
    run: str
    kind: str  # "dense" or "pruned"
    method: str
    model: str
    data: str
    family: str | None = None  # the summaries' "family" (structured, unstructured); None for dense rows
    budget: float | None = None  # flops_ratio target (structured) or density target (unstructured)
    flops_ratio: float | None = None  # achieved kept MACs / dense MACs (unstructured: if masked weights were skipped)
    density: float | None = None  # unstructured: kept weights / scored weights
    params: int | None = None
    top1: float | None = None  # headline (prompt.headline)
    top1_prompt: float | None = None
    top1_no_prompt: float | None = None
    top5: float | None = None
    accuracy_from: str = ""
    latency: dict | None = None  # finetune's CPU latency of the pruned and dense backbones
    wall_seconds: float = 0.0  # this run's own stages (a sweep point's shared dense run counts in its own row)
    kept_widths: dict | None = None  # layer -> [kept, total]
    density_per_layer: dict | None = None
    curves: dict = field(default_factory=dict)  # stage -> metrics.jsonl records

    @property
    def structured(self) -> bool:
        return self.family == STRUCTURED

    @property
    def unstructured(self) -> bool:
        return self.family == UNSTRUCTURED

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.budget is None:
            return self.method
        return f"{self.method} {'FLOPs' if self.structured else 'density'} {self.budget:g}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a kill: the rest of the log is still worth showing
                raise ReportError(f"cannot read {path} line {number}: not JSON") from None
    return records


def run_config(root: Path) -> dict:
    path = root / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ReportError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def report_runs(root: Path) -> list[Path]:
    """The run directories a report on `root` (a run or a sweep) covers, dense sources first."""
    if (root / SWEEP_FILE).exists():
        sweep = read_json(root / SWEEP_FILE)
        names = [s["run"] for s in sweep.get("shared", [])] + [p["run"] for p in sweep.get("points", [])]
        return [root / name for name in names if (root / name / "config.yaml").exists()]
    if not (root / "config.yaml").exists():
        raise ReportError(f"{root} is neither a run (no config.yaml) nor a sweep (no {SWEEP_FILE})")
    runs = [root]
    dense_run = run_config(root).get("dense_run")
    if dense_run:
        source = Path(dense_run).expanduser()
        if "/" not in dense_run:  # a run name under the same runs_dir (stages.sources.dense_source_run)
            source = root.parent / dense_run
        if (source / "config.yaml").exists():
            runs.insert(0, source)
    return runs


def rows_of_run(root: Path) -> list[Row]:
    run = RunDir(root.parent, root.name)
    cfg = run_config(root)
    method = cfg.get("method", {}).get("name", "?")
    summaries = {s: read_json(run.result(s) / "summary.json") for s in (*TRAINING_STAGES, "eval") if run.is_done(s)}
    curves = {s: read_metrics(run.stage(s) / "metrics.jsonl") for s in TRAINING_STAGES}
    rows = []
    if "dense" in summaries:
        d = summaries["dense"]
        name = root.name if method == "dense" else f"{root.name}/dense"  # a pruning run's own dense stage
        row = Row(run=name, kind="dense", method="dense", model=d["model"], data=d["data"], flops_ratio=1.0,
                  density=1.0, params=d["params"], top1=d["top1"], top1_no_prompt=d["top1"], top5=d["top5"],
                  accuracy_from="dense", wall_seconds=d.get("wall_seconds", 0.0), curves={"dense": curves["dense"]})
        evaluated = summaries.get("eval")
        if evaluated and evaluated.get("product") == "dense":
            row.top1, row.top1_no_prompt, row.top5, row.accuracy_from = (evaluated["top1"], evaluated["top1_no_prompt"],
                                                                         evaluated["top5"], "eval")
        rows.append(row)
    final = summaries.get("finetune") or summaries.get("search")
    if method != "dense" and final:
        rows.append(_pruned_row(root.name, method, cfg, summaries, final, curves))
    return rows


def _pruned_row(name: str, method: str, cfg: dict, summaries: dict, final: dict, curves: dict) -> Row:
    # Summaries name their family; those written before they did get it from the registry.
    family = final.get("family") or family_of(method)
    unstructured = family == UNSTRUCTURED
    pruning = cfg.get("pruning", {})
    row = Row(run=name, kind="pruned", method=method, family=family, model=final["model"], data=final["data"],
              budget=pruning.get("density" if unstructured else "flops_ratio"), params=final.get("params"),
              top1=final["top1"], top1_prompt=final.get("top1_prompt"), top1_no_prompt=final.get("top1_no_prompt"),
              top5=final["top5"], accuracy_from=final["stage"], latency=final.get("latency"),
              wall_seconds=sum(summaries[s].get("wall_seconds", 0.0) for s in ("search", "finetune") if s in summaries),
              curves={s: curves[s] for s in ("search", "finetune") if curves[s]})
    if unstructured:
        row.density = final.get("density_achieved")
        if final.get("flops_sparse") and final.get("flops_dense"):
            row.flops_ratio = final["flops_sparse"] / final["flops_dense"]
        row.density_per_layer = final.get("density_per_layer")
    else:
        row.flops_ratio = final.get("flops_ratio_achieved")
        row.kept_widths = final.get("kept_widths")
    evaluated = summaries.get("eval")
    if evaluated and evaluated.get("product") == "finetune":
        row.top1, row.top1_prompt, row.top1_no_prompt, row.top5 = (evaluated["top1"], evaluated["top1_prompt"],
                                                                   evaluated["top1_no_prompt"], evaluated["top5"])
        row.accuracy_from = "eval"
    return row


def collect(root: Path) -> list[Row]:
    runs = report_runs(root)
    if not runs:
        raise ReportError(f"{root} has no runs with results yet")
    return [row for run in runs for row in rows_of_run(run)]

"""Sweeps over seeds: mean ± standard deviation per setting, and paired differences with 95% intervals.

A sweep whose axes include `seed` repeats every other setting once per seed. Here a *setting* is a
point's axis values without the seed, plus its method; its runs are summarised by the mean and the
sample standard deviation over seeds of: accuracy before finetune (the search stage's network) and
after it, each with and without the prompt, and the achieved budget. For every other axis with two
values (a prompt ablation's `use_prompt=true,false`), points that agree on everything else, seed included, are paired
and the difference (first value minus second) gets a Student-t 95% interval: the seed's own effect
(initialisation, sample order) cancels in the pair, so the interval is narrower than the two rows' stds
suggest. Used by the report and, over several sweeps at once, by `python -m trainer.report.seeds`, which
also pairs two sweeps (`--pair`: a method at a tuned setting against another sweep's ablation).
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..run_dir import SWEEP_FILE, RunDir
from .collect import ReportError, read_json, run_config

SEED_KEY = "seed"
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# (column title, where the figure comes from): (stage summary, key)
METRICS = {
    "before finetune, prompt": ("search", "top1_prompt"),
    "before finetune, no prompt": ("search", "top1_no_prompt"),
    "after finetune, prompt": ("finetune", "top1_prompt"),
    "after finetune, no prompt": ("finetune", "top1_no_prompt"),
}
# What the pairs compare: the headline (prompt.headline; with the prompt by default, and a run without a
# prompt has only the one figure), so that a method is compared with its no-prompt ablation as each is used.
PAIRED_METRICS = {
    "before finetune": ("search", "top1"),
    "after finetune": ("finetune", "top1"),
}


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass
class SeedRun:
    setting: tuple[tuple[str, str], ...]  # (key, value) of the non-seed axes, method first
    seed: str
    figures: dict[str, float | None]
    achieved: str  # "FLOPs 0.498" / "density 0.1000"


@dataclass
class Paired:
    axis: str
    values: tuple[str, str]
    rest: tuple[tuple[str, str], ...]  # the other settings the pairs share
    metric: str
    differences: list[float] = field(default_factory=list)

    @property
    def interval(self) -> tuple[float, float, float] | None:
        """(mean, low, high) of the paired difference; None with fewer than two pairs."""
        n = len(self.differences)
        if n < 2:
            return None
        mean = statistics.fmean(self.differences)
        half = t975(n - 1) * statistics.stdev(self.differences) / math.sqrt(n)
        return mean, mean - half, mean + half


def _achieved(search: dict, final: dict) -> str:
    if final.get("density_achieved") is not None:
        return f"density {final['density_achieved']:.4f}"
    ratio = final.get("flops_ratio_achieved", search.get("flops_ratio_achieved"))
    return "—" if ratio is None else f"FLOPs {ratio:.3f}"


def seed_runs(sweep: Path) -> list[SeedRun]:
    """The finished points of a sweep with a seed axis (empty if it has none)."""
    listing = read_json(sweep / SWEEP_FILE)
    runs = []
    for point in listing.get("points", []):
        overrides = point["overrides"]
        if SEED_KEY not in overrides:
            return []
        run = RunDir(sweep, point["run"])
        if not (run.is_done("search") and run.is_done("finetune")):
            continue
        summaries = {s: run.summary(s) for s in ("search", "finetune")}
        method = run_config(sweep / point["run"]).get("method", {}).get("name", "?")
        setting = (("method", method),) + tuple((k, v) for k, v in overrides.items() if k not in (SEED_KEY, "method"))
        figures = {title: summaries[stage].get(key) for title, (stage, key) in {**METRICS, **PAIRED_METRICS}.items()}
        runs.append(SeedRun(setting, overrides[SEED_KEY], figures, _achieved(summaries["search"],
                                                                              summaries["finetune"])))
    return runs


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _label(setting) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" if k != "method" else v for k, v in setting)


def setting_table(runs: list[SeedRun]) -> list[str]:
    """Markdown: one row per setting, mean ± std over its seeds."""
    settings: dict[tuple, list[SeedRun]] = {}
    for r in runs:
        settings.setdefault(r.setting, []).append(r)
    head = ["setting", "seeds", *(f"top-1 % {t}" for t in METRICS), "achieved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for setting, group in settings.items():
        cells = [_label(setting), ",".join(sorted(r.seed for r in group))]
        for title in METRICS:
            cells.append(_mean_std([r.figures[title] for r in group if r.figures[title] is not None]))
        achieved = sorted({r.achieved for r in group})
        cells.append(achieved[0] if len(achieved) == 1 else f"{achieved[0]} – {achieved[-1]}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paired_differences(runs: list[SeedRun]) -> list[Paired]:
    """Differences between the two values of every two-valued axis, paired on all else (seed included)."""
    values: dict[str, list[str]] = {}
    for r in runs:
        for k, v in r.setting:
            if v not in values.setdefault(k, []):
                values[k].append(v)
    by_key = {(r.setting, r.seed): r for r in runs}
    found: dict[tuple, Paired] = {}
    for axis, seen in values.items():
        if len(seen) != 2 or axis == "method":
            continue
        first, second = seen
        for r in runs:
            if dict(r.setting)[axis] != first:
                continue
            other = tuple((k, second if k == axis else v) for k, v in r.setting)
            partner = by_key.get((other, r.seed))
            if partner is None:
                continue
            rest = tuple((k, v) for k, v in r.setting if k != axis)
            for metric in PAIRED_METRICS:
                a, b = r.figures[metric], partner.figures[metric]
                if a is None or b is None:
                    continue
                key = (axis, rest, metric)
                found.setdefault(key, Paired(axis, (first, second), rest, metric)).differences.append(a - b)
    return list(found.values())


def paired_between(first: list[SeedRun], second: list[SeedRun], names: tuple[str, str],
                   chosen: frozenset[str] = frozenset()) -> list[Paired]:
    """Differences between two groups of runs (two sweeps, or parts of them), paired on the seed and on every
    setting key both have except `chosen` (the keys that picked the groups; keys only one side has, such as
    the axis of the other side's sweep, are not compared either): a method at a tuned setting against
    another sweep's ablation."""
    found: dict[tuple, Paired] = {}
    for a in first:
        for b in second:
            if a.seed != b.seed:
                continue
            sb = dict(b.setting)
            common = tuple((k, v) for k, v in a.setting if k in sb and k not in chosen)
            if any(sb[k] != v for k, v in common):
                continue
            for metric in PAIRED_METRICS:
                if a.figures[metric] is None or b.figures[metric] is None:
                    continue
                found.setdefault((common, metric), Paired("", names, common, metric)).differences.append(
                    a.figures[metric] - b.figures[metric])
    return list(found.values())


def _selected(spec: str) -> tuple[list[SeedRun], str, set[str]]:
    """`<sweep dir>[:key=value,...]`: that sweep's finished points whose settings have those values, a name
    for them, and the keys that selected them."""
    path, _, filters = spec.partition(":")
    wanted = dict(f.split("=", 1) for f in filters.split(",") if f)
    runs = [r for r in seed_runs(Path(path).expanduser())
            if all(dict(r.setting).get(k) == v for k, v in wanted.items())]
    return runs, Path(path).name + (f" ({filters})" if filters else ""), set(wanted)


def paired_table(pairs: list[Paired]) -> list[str]:
    head = ["difference", "with", "top-1 (headline)", "pairs", "mean (points)", "95% interval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p in pairs:
        interval = p.interval
        mean = f"{statistics.fmean(p.differences):+.2f}"
        text = "—" if interval is None else f"[{interval[1]:+.2f}, {interval[2]:+.2f}]"
        what = f"{p.axis.split('.')[-1]}={p.values[0]} − {p.values[1]}" if p.axis else f"{p.values[0]} − {p.values[1]}"
        lines.append(f"| {what} | {_label(p.rest)} | {p.metric} | "
                     f"{len(p.differences)} | {mean} | {text} |")
    return lines


def seeds_markdown(sweeps: list[Path]) -> list[str]:
    """The two tables for one or more sweeps (empty when none has a seed axis or a finished point)."""
    runs = [r for s in sweeps for r in seed_runs(s)]
    if not runs:
        return []
    lines = ["## Across seeds", "", "Mean ± sample standard deviation over the seeds of each setting (top-1 on the "
             "validation split, in %).", "", *setting_table(runs)]
    pairs = paired_differences(runs)
    if pairs:
        lines += ["", "## Paired by seed", "",
                  "Each two-valued axis: the difference between its two values for the same seed and otherwise the "
                  "same setting, with a Student-t 95% interval over the pairs.", "", *paired_table(pairs)]
    return lines


USAGE = ("usage: python -m trainer.report.seeds <sweep directory> [<sweep directory> ...]\n"
         "       python -m trainer.report.seeds --pair <sweep>[:key=value,...] <sweep>[:key=value,...]")


def main(argv: list[str]) -> int:
    """`python -m trainer.report.seeds <sweep dir> [...]`: the tables of several sweeps together, on stdout.
    `--pair A[:k=v,...] B[:k=v,...]`: the paired differences between two sweeps' (selected) points."""
    if not argv or (argv[0] == "--pair" and len(argv) != 3):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        if argv[0] == "--pair":
            (first, a, keys_a), (second, b, keys_b) = _selected(argv[1]), _selected(argv[2])
            pairs = paired_between(first, second, (a, b), frozenset(keys_a | keys_b))
            print("\n".join(paired_table(pairs)) if pairs else "no runs of the two share a seed and settings")
            return 0
        lines = seeds_markdown([Path(a).expanduser() for a in argv])
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines) if lines else "no finished point of a sweep with a seed axis")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

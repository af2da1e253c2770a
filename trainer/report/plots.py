"""The report's PNG plots: accuracy vs FLOPs and vs density, per-layer structure, training curves.

Each plot function returns the file it wrote, or None when the runs have nothing to show
for it (no unstructured run: no density plot). The dense baseline is a horizontal line
wherever accuracy is plotted.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from .collect import Row  # noqa: E402

DPI = 120
MARKERS = "osD^vP*Xh"


def _dense_lines(ax, dense: list[Row]) -> None:
    for i, row in enumerate(dense):
        name = "dense baseline" + (f" ({row.run})" if len(dense) > 1 else "")
        ax.axhline(row.top1, color="black", linestyle="--", linewidth=1.2, alpha=0.8 - 0.2 * (i % 3),
                   label=f"{name}: {row.top1:.2f}%")


def _by_method(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.method, []).append(row)
    return groups


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # keeps a legend placed outside the axes
    plt.close(fig)
    return path


def accuracy_vs(rows: list[Row], dense: list[Row], path: Path, *, x: str, title: str, xlabel: str) -> Path | None:
    """Top-1 against the achieved FLOPs ratio or density, one line per method (the Pareto view)."""
    points = [r for r in rows if getattr(r, x) is not None and r.top1 is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (method, group) in enumerate(sorted(_by_method(points).items())):
        group = sorted(group, key=lambda r: getattr(r, x))
        unstructured = group[0].unstructured and x == "flops_ratio"
        ax.plot([100 * getattr(r, x) for r in group], [r.top1 for r in group], marker=MARKERS[i % len(MARKERS)],
                linestyle=":" if unstructured else "-", markerfacecolor="none" if unstructured else None,
                label=f"{method} (theoretical sparse FLOPs)" if unstructured else method)
    _dense_lines(ax, dense)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.set_xlim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def per_layer(rows: list[Row], path: Path, *, attr: str, title: str, ylabel: str) -> Path | None:
    """Kept fraction per layer (kept widths of structured runs, densities of unstructured ones), one line per run."""
    runs = [r for r in rows if getattr(r, attr)]
    if not runs:
        return None
    layers = list(getattr(runs[0], attr))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.22 * len(layers) + 2), 4.8))
    labels = [r.label for r in runs]
    for i, row in enumerate(runs):
        values = getattr(row, attr)
        fractions = [(values[k][0] / values[k][1] if isinstance(values[k], list) else values[k])
                     if k in values else float("nan") for k in layers]
        ax.plot(range(len(layers)), [100 * f for f in fractions], marker=MARKERS[i % len(MARKERS)], markersize=3,
                linewidth=1, label=row.label if labels.count(row.label) == 1 else f"{row.label} ({row.run})")
    ax.axhline(100, color="black", linestyle="--", linewidth=1.2, label="dense baseline: 100%")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_xlabel("layer (in network order)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines use the whole height
    return _save(fig, path)


def training_curves(rows: list[Row], dense: list[Row], path: Path) -> Path | None:
    """Training loss and validation top-1 against epochs, one row of panels per stage, one line per run."""
    stages = [s for s in ("dense", "search", "finetune") if any(r.curves.get(s) for r in rows)]
    if not stages:
        return None
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.3 * len(stages)), squeeze=False)
    for (loss_ax, acc_ax), stage in zip(axes, stages):
        for i, row in enumerate(r for r in rows if r.curves.get(stage)):
            records = row.curves[stage]
            color = f"C{i % 10}"
            label = row.label if row.kind == "dense" else f"{row.label}"
            steps = [r for r in records if r.get("kind") == "train"]
            epochs = [r for r in records if r.get("kind") == "epoch"]
            if steps:
                loss_ax.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], color=color, linewidth=1,
                             alpha=0.6)
            loss_ax.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], color=color, marker="o",
                         markersize=3, linewidth=1.5, label=label)
            acc_ax.plot([r["epoch"] for r in epochs], [r["val_top1"] for r in epochs], color=color, marker="o",
                        markersize=3, label=label)
        if stage != "dense":
            _dense_lines(acc_ax, dense)
        loss_ax.set_title(f"{stage}: training loss" + (" (cross-entropy + budget term for PASS)"
                                                        if stage == "search" else "")
                          + "\nthin: running mean within the epoch; dots: epoch mean", fontsize=9)
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("training loss")
        acc_ax.set_title(f"{stage}: validation top-1 after each epoch", fontsize=9)
        acc_ax.set_xlabel("epoch")
        acc_ax.set_ylabel("top-1 accuracy (%)")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    return _save(fig, path)

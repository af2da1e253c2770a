"""`launch.py --help`: groups with their options, then every key with its default and meaning."""
from __future__ import annotations

import dataclasses

from .load import CONFIGS_DIR, group_options, load_config
from .schema import GROUPS, METHOD_SECTIONS, RootConfig

USAGE = """usage: python slurm/launch.py [-m] [key=value ...]

Runs the stages of a pruning run. Every setting is a key=value override;
group=option picks configs/<group>/<option>.yaml. Examples:
  python slurm/launch.py                                   # the whole pipeline on the embedded synthetic data
  python slurm/launch.py stage=dense model=resnet18 data=imagefolder data.train_dir=/data/cifar10/train
  python slurm/launch.py stage=eval run=<name> data.val_dir=/data/other_val
  torchrun --nproc_per_node 2 slurm/launch.py stage=dense   # several local processes (DDP)
  python slurm/launch.py stage=all cluster=slurm cluster.partition=gpu   # one SLURM job per stage, chained
  python slurm/launch.py -m method=pass,l1 pruning.flops_ratio=0.3,0.5   # a sweep: every combination
  python slurm/launch.py experiment=vpns_paper data.train_dir=...        # a recipe (configs/experiment/)
  python slurm/launch.py stage=status run=<run or sweep>   # stage=cancel run=... cancels its jobs
  python slurm/launch.py stage=report run=<run or sweep>   # report.md + plots (also written after stage=all)
Flags: --help (this text), -m (sweep).  Outputs go to <runs_dir>/<run>/<stage>/; see docs/cluster.md.
"""


def _rows(defaults, values, prefix=""):
    """(key, value, help) for every leaf key, walking the schema dataclasses."""
    for f in dataclasses.fields(defaults):
        child = getattr(defaults, f.name)
        if dataclasses.is_dataclass(child):
            yield from _rows(child, values[f.name], f"{prefix}{f.name}.")
        else:
            value = values[f.name]
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
            yield f"{prefix}{f.name}", shown, f.metadata.get("help", "")


def help_text() -> str:
    lines = [USAGE, "Groups (group=option; default marked *):"]
    cfg = load_config([])
    for group in GROUPS:
        options = [o + ("*" if o == cfg[group].name else "") for o in group_options(group)]
        lines.append(f"  {group:<9} {', '.join(options)}")
    experiments = group_options("experiment")
    if experiments:
        lines.append(f"  {'experiment':<9} {', '.join(experiments)}  (recipes: configs/experiment/; none by default)")
    lines.append("\nKeys (defaults shown for the default groups):")
    rows = list(_rows(RootConfig(), cfg))
    for name, section in METHOD_SECTIONS.items():
        rows += list(_rows(section(), cfg[name], f"{name}."))
    for key, value, text in rows:
        if key.endswith(".name") and key.split(".")[0] in GROUPS:
            continue  # set through the group token
        if key == "run":
            value = "null"  # derived per command: <model>-<data>-<method>[-<hash of overrides>]
        lines.append(f"  {key}={value}" + (f"\n      {text}" if text else ""))
    lines.append(f"\nConfig files: {CONFIGS_DIR}")
    return "\n".join(lines)

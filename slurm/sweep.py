"""Sweeps: `python slurm/launch.py -m method=pass,l1 pruning.flops_ratio=0.3,0.5` runs every combination.

A token whose value has commas (outside [..] and {..}) is an axis; the sweep is
the Cartesian product of the axes, each point a run of its own under
runs/<sweep>/<point>/, named after its values (`method-pass_flops_ratio-0.3`).
The sweep's name is derived from the command (or given with run=), so the
same command finds the same sweep again and resumes its unfinished points.
runs/<sweep>/sweep.json lists the points; `stage=status run=<sweep>` shows
their state.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

from omegaconf import DictConfig

from trainer.config import ConfigError, load_config, validate_config
from trainer.config.load import RUNTIME_KEYS, RUNTIME_SECTIONS, parse_overrides
from trainer.run_dir import timestamped, write_json

from .records import SWEEP_FILE, now

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def split_axes(tokens: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed tokens, [(key, values)]) from the command line of a sweep."""
    fixed, axes = [], []
    for key, value in parse_overrides(tokens):
        if "," in value and not value.startswith(("[", "{")):
            values = value.split(",")
            if any(v == "" for v in values) or len(set(values)) != len(values):
                raise ConfigError(f"{key}={value}: a sweep axis lists distinct, non-empty values")
            if key in RUNTIME_KEYS or key.split(".")[0] in RUNTIME_SECTIONS:
                raise ConfigError(f"{key} cannot be swept: it says how to run, not what to run")
            axes.append((key, values))
        else:
            fixed.append(f"{key}={value}")
    if not axes:
        raise ConfigError("-m needs at least one key with several values, e.g. method=pass,l1")
    return fixed, axes


def point_name(assignment: list[tuple[str, str]]) -> str:
    return "_".join(f"{key.split('.')[-1]}-{_UNSAFE.sub('-', value)}" for key, value in assignment)


def default_sweep_name(fixed: list[str], axes: list[tuple[str, list[str]]]) -> str:
    salient = sorted(t for t in fixed if t.partition("=")[0] not in RUNTIME_KEYS
                     and t.partition("=")[0].split(".")[0] not in RUNTIME_SECTIONS) + [repr(axes)]
    digest = hashlib.sha1(repr(salient).encode()).hexdigest()[:8]
    return "sweep-" + "-".join(key.split(".")[-1] for key, _ in axes) + f"-{digest}"


def expand(tokens: list[str]) -> tuple[Path, DictConfig, list[DictConfig], list[dict]]:
    """(sweep directory, base config, one checked config per point, the point list for sweep.json)."""
    fixed, axes = split_axes(tokens)
    base = load_config(fixed)  # runs_dir, stage, cluster and the sweep's name come from here
    validate_config(base)
    sweep = dict(parse_overrides(fixed)).get("run") or default_sweep_name(fixed, axes)
    if base.resume == "never":
        sweep = timestamped(sweep)
    root = Path(base.runs_dir).expanduser() / sweep
    without_run = [t for t in fixed if not t.startswith(("run=", "runs_dir=", "resume="))]
    configs, listing = [], []
    for values in itertools.product(*(v for _, v in axes)):
        assignment = list(zip((k for k, _ in axes), values))
        name = point_name(assignment)
        tokens = without_run + [f"{k}={v}" for k, v in assignment] + [f"runs_dir={root}", f"run={name}"]
        try:
            cfg = load_config(tokens)
            validate_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        configs.append(cfg)
        listing.append({"run": name, "overrides": dict(assignment)})
    return root, base, configs, listing


def write_sweep_file(root: Path, base: DictConfig, axes_listing: list[dict], tokens: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    path = root / SWEEP_FILE
    created = now()
    if path.exists():
        created = json.loads(path.read_text()).get("created", created)
    write_json(path, {"name": root.name, "created": created, "updated": now(), "command": tokens,
                      "stage": base.stage, "cluster": base.cluster.name, "points": axes_listing})

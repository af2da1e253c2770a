"""Sweeps: `python slurm/launch.py -m method=pass,l1 pruning.flops_ratio=0.3,0.5` runs every combination.

A token whose value has commas (outside [..] and {..}) is an axis; the sweep is
the Cartesian product of the axes, each point a run of its own under
runs/<sweep>/<point>/, named after its values (`method-pass_flops_ratio-0.3`).
The sweep's name is derived from the command (or given with run=), so the
same command finds the same sweep again and resumes its unfinished points.
runs/<sweep>/sweep.json lists the points; `stage=status run=<sweep>` shows
their state.

Points that differ only in what pruning does (method, budget, search and
finetune settings) would each train the same dense network: with stage=all
they share one instead, trained once as runs/<sweep>/dense/ (one per distinct
model/data/dense setting when those are swept too) and named by each point's
`dense_run`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.config import ConfigError, load_config, validate_config
from trainer.config.load import RUNTIME_KEYS, RUNTIME_SECTIONS, parse_overrides
from trainer.plan import has_weights
from trainer.run_dir import SWEEP_FILE, timestamped, write_json

from .records import now

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
# What the dense stage depends on: points equal in these can prune one shared dense network.
DENSE_SECTIONS = ("model", "data", "dense", "seed", "engine")


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


def _dense_setting(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(DENSE_SECTIONS)), resolve=True),
                      sort_keys=True)


def share_dense(root: Path, fixed: list[str], configs: list[DictConfig], listing: list[dict]) -> list[DictConfig]:
    """Point the stage=all pruning points at shared dense runs (set their `dense_run`); returns those runs' configs.

    Points given model.weights or their own dense_run, and method=dense points, keep their plan.
    """
    shared: dict[str, DictConfig] = {}
    absolute = root.resolve()  # jobs may start elsewhere than the launch directory
    for cfg, point in zip(configs, listing):
        own_source = cfg.dense_run and not str(cfg.dense_run).startswith(f"{absolute}/")  # a resumed point keeps ours
        if cfg.stage != "all" or cfg.method.name == "dense" or has_weights(cfg.model.weights) or own_source:
            continue
        setting = _dense_setting(cfg)
        if setting not in shared:
            swept = [(k, v) for k, v in point["overrides"].items() if k.split(".")[0] in DENSE_SECTIONS]
            name = "dense" + (f"_{point_name(swept)}" if swept else "")
            tokens = fixed + [f"{k}={v}" for k, v in swept] + [f"runs_dir={root}", f"run={name}", "stage=dense",
                                                               "method=dense"]
            dense = load_config(tokens)
            validate_config(dense)
            if _dense_setting(dense) != setting:  # a method's own defaults touched the dense stage: train per point
                continue
            shared[setting] = dense
        cfg.dense_run = str(absolute / shared[setting].run)
        point["dense_run"] = shared[setting].run
    return list(shared.values())


def expand(tokens: list[str]) -> tuple[Path, DictConfig, list[DictConfig], list[dict], list[DictConfig]]:
    """(sweep directory, base config, one checked config per point, the point list for sweep.json,
    the shared dense runs' configs)."""
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
    shared = share_dense(root, without_run, configs, listing)
    return root, base, configs, listing, shared


def write_sweep_file(root: Path, base: DictConfig, axes_listing: list[dict], tokens: list[str],
                     shared: list[DictConfig] = ()) -> None:
    root.mkdir(parents=True, exist_ok=True)
    path = root / SWEEP_FILE
    created = now()
    if path.exists():
        created = json.loads(path.read_text()).get("created", created)
    write_json(path, {"name": root.name, "created": created, "updated": now(), "command": tokens,
                      "stage": base.stage, "cluster": base.cluster.name,
                      "shared": [{"run": d.run, "stage": "dense"} for d in shared], "points": axes_listing})

"""Recipes: `experiment=<name>` (configs/experiment/<name>.yaml) sets a whole protocol in one token.

An experiment file lists the protocol's settings (`overrides`: the same key=value tokens as the
command line, group choices included) and the values it is meant to run at (`sweep`: key -> values).
The launcher puts the file's tokens before the command line's, so whatever is typed wins:

    python slurm/launch.py experiment=vpns_paper data.train_dir=...                  # the recipe: every point
    python slurm/launch.py experiment=vpns_paper seed=7 pruning.density=0.1 ...      # one point of it
    python slurm/launch.py -m experiment=vpns_paper seed=1,2 ...                     # a sweep of it

A key given on the command line replaces the recipe's axis for that key. While axes with several
values are left, the command is a sweep (as with -m), named after the recipe unless run= is given;
when none is left it is a single run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from .load import CONFIGS_DIR, ConfigError, _load_yaml, group_options, parse_overrides

EXPERIMENT_KEY = "experiment"
_FILE_KEYS = ("description", "overrides", "sweep")


@dataclass
class Experiment:
    name: str
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    sweep: dict[str, list[str]] = field(default_factory=dict)


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def load_experiment(name: str, configs_dir: Path = CONFIGS_DIR) -> Experiment:
    options = group_options(EXPERIMENT_KEY, configs_dir)
    if name not in options:
        raise ConfigError(f"experiment={name} is not an option; choose from: {', '.join(options)}")
    path = configs_dir / EXPERIMENT_KEY / f"{name}.yaml"
    raw = OmegaConf.to_container(_load_yaml(path)) or {}
    unknown = sorted(set(raw) - set(_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown entries {', '.join(unknown)}; an experiment has {', '.join(_FILE_KEYS)}")
    overrides = [str(t) for t in raw.get("overrides") or []]
    try:
        keys = [k for k, _ in parse_overrides(overrides)]
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if EXPERIMENT_KEY in keys:
        raise ConfigError(f"{path}: an experiment cannot pick another experiment")
    sweep = {}
    for key, values in (raw.get("sweep") or {}).items():
        values = values if isinstance(values, list) else [values]
        if not values or len(set(map(_value, values))) != len(values):
            raise ConfigError(f"{path}: sweep.{key} lists distinct values, at least one")
        sweep[str(key)] = [_value(v) for v in values]
    return Experiment(name, str(raw.get("description") or ""), overrides, sweep)


def expand_experiment(tokens: list[str], sweep: bool, configs_dir: Path = CONFIGS_DIR) -> tuple[list[str], bool]:
    """The command's tokens with `experiment=<name>` replaced by the recipe's, and whether it is a sweep."""
    picked = [t for t in tokens if t.partition("=")[0] == EXPERIMENT_KEY]
    if not picked:
        return tokens, sweep
    if len(picked) > 1:
        raise ConfigError(f"experiment= is given {len(picked)} times; pick one recipe")
    exp = load_experiment(picked[0].partition("=")[2], configs_dir)
    rest = [t for t in tokens if t.partition("=")[0] != EXPERIMENT_KEY]
    given = {key for key, _ in parse_overrides(rest)}
    left = {key: values for key, values in exp.sweep.items() if key not in given}
    axes = [f"{key}={','.join(values)}" for key, values in left.items() if len(values) > 1]
    singles = [f"{key}={values[0]}" for key, values in left.items() if len(values) == 1]
    expanded = [*exp.overrides, *singles, *axes, *rest]
    if axes and "run" not in given:
        expanded.append(f"run={exp.name}")
    return expanded, sweep or bool(axes)

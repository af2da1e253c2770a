"""Compose the run configuration: schema defaults <- group files <- root file <- command line.

    python slurm/launch.py model=resnet50 data=imagenet dense.epochs=90

A `group=option` token picks configs/<group>/<option>.yaml (its keys go under
the group; its `_global_:` block, if any, sets keys elsewhere, e.g. a method's
search schedule); a dotted `key=value`
token overrides one key. Everything is checked against the dataclass schema in
`schema.py`; problems raise ConfigError with a one-line message that names the
key and what is allowed (the launcher prints it without a traceback).
"""
from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import GROUPS, root_config

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# Keys that say how to run this invocation, not what the run is: they never
# come from a stored run config and never change the default run name.
RUNTIME_KEYS = ("stage", "run", "runs_dir", "resume", "print_config", "logger")
# Likewise where the jobs run: a run started locally may continue on the cluster.
RUNTIME_SECTIONS = ("cluster",)
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")  # sbatch options have hyphens


class ConfigError(ValueError):
    """A user-facing configuration problem; str(e) is one line."""


def group_options(group: str, configs_dir: Path = CONFIGS_DIR) -> list[str]:
    return sorted(p.stem for p in (configs_dir / group).glob("*.yaml"))


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """Split `key=value` tokens, rejecting anything else with a clear message."""
    pairs = []
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep or not _KEY_RE.match(key):
            raise ConfigError(f"cannot read '{tok}': arguments are key=value (see --help)")
        pairs.append((key, value))
    return pairs


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as e:  # yaml errors are ValueErrors
        raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _node(cfg: DictConfig, key: str):
    """The omegaconf node at a dotted key, or a ConfigError naming what exists there."""
    node = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth]) or "the root"
        if not isinstance(node, DictConfig):
            raise ConfigError(f"unknown key '{key}': '{parent}' is a value, not a section")
        if _is_free_mapping(node):  # e.g. cluster.extra_sbatch: any key may be added
            return node._get_node(part) if part in node else node
        allowed = [str(k) for k in node.keys()]  # keys(), not `in`: `in` hides ??? values
        if part not in allowed:
            guess = difflib.get_close_matches(part, allowed, n=1)
            hint = f" (did you mean '{'.'.join(parts[:depth] + [guess[0]])}'?)" if guess else ""
            raise ConfigError(f"unknown key '{key}'{hint}; keys under {parent}: {', '.join(allowed)}")
        node = node._get_node(part)
    return node


def _is_free_mapping(node) -> bool:
    """A Dict[str, Any] field (not a schema section): its keys are the user's."""
    return isinstance(node, DictConfig) and node._metadata.object_type is dict


def _type_name(cfg: DictConfig, key: str) -> str:
    node = _node(cfg, key)
    names = {"IntegerNode": "an integer", "FloatNode": "a number", "BooleanNode": "true or false",
             "StringNode": "a string", "AnyNode": "a value"}
    base = names.get(type(node).__name__, "a value")
    return base + (" or null" if node._is_optional() else "")


def _apply(cfg: DictConfig, key: str, raw: str) -> None:
    node = _node(cfg, key)
    if isinstance(node, DictConfig) and not _is_free_mapping(node):
        raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. {key}.<key>=value")
    try:
        cfg.merge_with(OmegaConf.from_dotlist([f"{key}={raw}"]))  # the schema checks the type
    except OmegaConfBaseException:
        raise ConfigError(f"{key}={raw}: expected {_type_name(cfg, key)}") from None


def _merge_file(cfg: DictConfig, content: DictConfig, where: str, prefix: str = "") -> None:
    """Merge a config file, turning schema violations into ConfigErrors naming the file."""
    for key in _flat_keys(content):
        try:
            _node(cfg, f"{prefix}{key}")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    try:
        cfg.merge_with(OmegaConf.create({prefix[:-1]: content}) if prefix else content)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None


def _flat_keys(content: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in content.keys():
        v = content._get_node(k)
        if isinstance(v, DictConfig) and len(v) > 0:
            keys += _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def default_run_name(cfg: DictConfig, overrides: list[tuple[str, str]]) -> str:
    """A readable, deterministic name: the same command maps to the same run (and so resumes it)."""
    name = f"{cfg.model.name}-{cfg.data.name}-{cfg.method.name}"
    salient = sorted((k, v) for k, v in overrides
                     if k not in RUNTIME_KEYS and k not in GROUPS and k.split(".")[0] not in RUNTIME_SECTIONS)
    if salient:
        name += "-" + hashlib.sha1(repr(salient).encode()).hexdigest()[:8]
    return name


def load_config(tokens: list[str], configs_dir: Path = CONFIGS_DIR) -> DictConfig:
    """Build and check the config for these command-line tokens (without validating values)."""
    overrides = parse_overrides(tokens)
    root = _load_yaml(configs_dir / "config.yaml")
    selections = dict(root.get("defaults", {}))
    group_tokens = {k: v for k, v in overrides if k in GROUPS}
    for group, option in group_tokens.items():
        options = group_options(group, configs_dir)
        if option not in options:
            raise ConfigError(f"{group}={option} is not an option; choose from: {', '.join(options)}")
    selections.update(group_tokens)

    cfg = root_config()
    section_defaults = []
    for group in GROUPS:
        option = selections[group]
        where = f"configs/{group}/{option}.yaml"
        content = _load_yaml(configs_dir / group / f"{option}.yaml")
        # `_global_:` in a group file sets keys outside its group (a method's own search schedule).
        if "_global_" in content:
            section_defaults.append((content.pop("_global_"), f"{where} (_global_)"))
        _merge_file(cfg, content, where, prefix=f"{group}.")
    for content, where in section_defaults:
        _merge_file(cfg, content, where)
    root_body = OmegaConf.create({k: v for k, v in root.items() if k != "defaults"})
    _merge_file(cfg, root_body, "configs/config.yaml")

    dotted = [(k, v) for k, v in overrides if k not in GROUPS]
    for key, raw in dotted:  # first pass: catches bad keys/types before looking at runs
        _apply(cfg, key, raw)

    run = cfg.run or default_run_name(cfg, overrides)
    stored_path = Path(cfg.runs_dir).expanduser() / run / "config.yaml"
    if stored_path.exists():
        # An existing run is continued with the config it was created with; the
        # command line may change schedules or data paths but not the groups.
        stored = _load_yaml(stored_path)
        for group, option in group_tokens.items():
            if group not in RUNTIME_SECTIONS and stored[group].name != option:
                raise ConfigError(f"run '{run}' was created with {group}={stored[group].name}; "
                                  f"choose another run= for {group}={option}")
        fresh = root_config()
        body = OmegaConf.masked_copy(stored, [k for k in stored.keys()
                                              if k not in RUNTIME_KEYS and k not in RUNTIME_SECTIONS])
        _merge_file(fresh, body, str(stored_path))
        for section in RUNTIME_SECTIONS:  # from this command line, not from the stored run
            fresh[section] = cfg[section]
        for key, raw in dotted:
            _apply(fresh, key, raw)
        cfg = fresh
    cfg.run = run
    return cfg

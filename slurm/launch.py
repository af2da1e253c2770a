#!/usr/bin/env python
"""Entry point: `python slurm/launch.py [key=value ...]` (see --help).

Reads the config, checks it completely before any work, then runs the
requested stages here (cluster=local; also under torchrun for several
processes).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from trainer.config import ConfigError, help_text, load_config, validate_config

    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg = load_config(argv)
        validate_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0

    from trainer.data import DataError
    from trainer.models import ModelError
    from trainer.stages import StageNotImplemented, run_stages

    try:
        run_stages(cfg)
    except (StageNotImplemented, DataError, ModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; relaunch the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

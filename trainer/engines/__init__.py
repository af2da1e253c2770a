"""Distributed engines behind one interface (see base.Engine)."""
from omegaconf import DictConfig

from ..distributed import DistEnv
from .base import Engine
from .ddp import DDPEngine

ENGINES = {"ddp": DDPEngine}


def make_engine(cfg: DictConfig, env: DistEnv) -> Engine:
    return ENGINES[cfg.name](cfg, env)


__all__ = ["Engine", "DDPEngine", "make_engine"]

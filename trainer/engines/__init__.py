"""Distributed engines behind one interface (see base.Engine)."""
from omegaconf import DictConfig

from ..distributed import DistEnv
from .base import Engine
from .ddp import DDPEngine

ENGINES = ("ddp", "deepspeed")


def make_engine(cfg: DictConfig, env: DistEnv) -> Engine:
    if cfg.name == "deepspeed":
        from .deepspeed import DeepSpeedEngine  # imports DeepSpeed: only when chosen
        return DeepSpeedEngine(cfg, env)
    return DDPEngine(cfg, env)


__all__ = ["Engine", "DDPEngine", "make_engine"]

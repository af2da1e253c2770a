"""Stages of a run and the order `stage=all` runs them in."""
from .context import StageContext, StageNotImplemented
from .runner import run_stages

__all__ = ["StageContext", "StageNotImplemented", "run_stages"]

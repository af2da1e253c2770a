"""What the search stage lends a pruning method (pruning.methods.SearchJob): training, data, processes."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from ..data import DataFiles
from ..loop import fit
from .context import StageContext
from .sources import same_on_every_rank


@dataclass
class StageSearchJob:
    ctx: StageContext
    files: DataFiles
    backbone: nn.Module
    prompt: Any
    head_name: str
    train_head: bool

    @property
    def cfg(self):
        return self.ctx.cfg

    @property
    def world_size(self) -> int:
        return self.ctx.engine.world_size

    @property
    def device(self):
        return self.ctx.engine.device

    def fit(self, model, params, views=None):
        """Train `params` of `model` with the search schedule, resuming from the stage's checkpoints."""
        ctx, cfg = self.ctx, self.ctx.cfg
        return fit(engine=ctx.engine, model=model, params=params, schedule=cfg.search,
                   train_loader=ctx.train_loader(self.files), val_loader=ctx.val_loader(self.files),
                   stage_dir=ctx.run.stage("search"), checkpoint_cfg=cfg.checkpoint, log_cfg=cfg.log,
                   tensorboard=ctx.tensorboard, loss_fn=ctx.loss_fn(cfg.search), resume=cfg.resume == "auto",
                   desc="search", views=views)

    def prepare(self, module):
        return self.ctx.engine.prepare_module(module)

    def batches(self, count: int) -> Iterator:
        """The first `count` batches (images, labels) of this process's share of the training split, center
        crop and no augmentation (the same images on every run of a seed), on the device."""
        loader = self.ctx.val_loader(self.files, self.files.train)
        if len(loader) < count:
            raise ValueError(f"{count} batches asked for, but the training split gives {len(loader)} per process "
                             f"at data.batch_size={self.cfg.data.batch_size}")
        return itertools.islice(iter(loader), count)

    def all_reduce_sum(self, tensor):
        return self.ctx.engine.all_reduce_sum(tensor)

    def same_on_every_rank(self, tensors, what: str) -> list[str]:
        return same_on_every_rank(self.ctx.engine, tensors, what)

    def say(self, message: str) -> None:
        self.ctx.say(message)

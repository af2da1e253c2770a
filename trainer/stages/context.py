"""What every stage receives: config, engine, run directory, and shared helpers."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ..data import DataFiles, TrainLoader, prepare_data, prepare_eval_data, val_loader
from ..engines import Engine
from ..run_dir import RunDir


class StageNotImplemented(RuntimeError):
    """The stage exists in the interface but its method is not built yet (one-line message)."""


@dataclass
class StageContext:
    cfg: DictConfig
    engine: Engine
    run: RunDir

    def say(self, msg: str) -> None:
        if self.engine.is_main:
            tqdm.write(msg, file=sys.stdout)

    def say_any_rank(self, msg: str) -> None:
        """A line from any process, prefixed with its rank (what a waiting process is doing)."""
        print(f"rank {self.engine.rank}: {msg}", flush=True)

    def data(self) -> DataFiles:
        """The run's train and validation .beton files: written (if missing) by the main process while the
        others wait for them outside any collective (trainer/data/prepare.py)."""
        return prepare_data(self.cfg.data, is_writer=self.engine.is_main, broadcast=self.engine.broadcast_object,
                            log=self.say, progress=self.cfg.log.progress, say_waiting=self.say_any_rank)

    def eval_data(self, classes) -> DataFiles:
        """A validation .beton of data.val_dir labelled with `classes` (a trained model's), as `data()`."""
        return prepare_eval_data(self.cfg.data, tuple(classes), is_writer=self.engine.is_main,
                                 broadcast=self.engine.broadcast_object, log=self.say,
                                 progress=self.cfg.log.progress, say_waiting=self.say_any_rank)

    @property
    def tensorboard(self) -> bool:
        """logger=tensorboard: the training loop also writes TensorBoard events."""
        return self.cfg.logger == "tensorboard"

    def per_process_batch(self) -> int:
        total, world = self.cfg.data.batch_size, self.engine.world_size
        if total % world:
            raise ValueError(f"data.batch_size={total} is not divisible by the {world} processes")
        return total // world

    def train_loader(self, files: DataFiles) -> TrainLoader:
        d = self.cfg.data
        return TrainLoader(files.train, res=d.res, batch_size=self.per_process_batch(), num_workers=d.num_workers,
                           seed=self.cfg.seed, device=self.engine.device, rank=self.engine.rank,
                           world_size=self.engine.world_size,
                           min_crop_scale=d.min_crop_scale, augment=d.augment, crop_ratio=d.val_crop_ratio,
                           channels_last=self.engine.channels_last, jit=d.jit)

    def val_loader(self, files: DataFiles, path=None):
        """Center-crop, unaugmented batches of the validation split (or of the beton at `path`)."""
        d = self.cfg.data
        return val_loader(path or files.val, res=d.res, batch_size=self.per_process_batch(), num_workers=d.num_workers,
                          device=self.engine.device, rank=self.engine.rank, world_size=self.engine.world_size,
                          crop_ratio=d.val_crop_ratio, channels_last=self.engine.channels_last, jit=d.jit)

    def loss_fn(self, schedule: DictConfig):
        return torch.nn.CrossEntropyLoss(label_smoothing=schedule.label_smoothing)

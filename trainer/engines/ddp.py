"""PyTorch DistributedDataParallel behind the engine interface (plain module on one process).

Checkpoints are one file written by rank 0 (`checkpoints/last.pt`, see
`trainer.checkpoint`): the plain module's state, identical on every rank, so
a run can resume on any number of processes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import CheckpointStore
from .base import Engine


def forward_updates_buffers(model: torch.nn.Module) -> bool:
    """True if a forward after `model.train()` (what the loop calls) updates BatchNorm running statistics.

    The project's other buffers are constants (prompt frame, normalisation, the frozen backbone's channel
    statistics), and a frozen backbone's train() keeps its BatchNorm in eval mode."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        return any(isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
                   for m in model.modules())
    finally:
        for m, mode in modes.items():
            m.training = mode


class DDPEngine(Engine):
    def wrap(self, model, optimizer, scheduler, *, batch_size: int, grad_clip: float = 0.0,
             find_unused_parameters: bool = False) -> None:
        self._check_batch(batch_size)
        if self.world_size > 1 and self.cfg.sync_bn:
            if self.device.type != "cuda":
                raise ValueError("engine.sync_bn=true needs GPUs: torch's SyncBatchNorm has no CPU implementation")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.raw = model
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self._micro = 0
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers a training forward changes (BatchNorm statistics) follow rank 0's, copied to every rank
            # before each forward; constant ones (a frozen backbone's) need no copy (docs/decisions.md).
            self.module = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                                  broadcast_buffers=forward_updates_buffers(model))
        else:
            self.module = model

    def micro_step(self, last: bool):
        # DDP decides in the forward whether the backward all-reduces: skip it on all but the last chunk.
        if last or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # Chunks of equal size: the mean of their mean losses is the batch's mean loss.
        (loss / self.micro_batches).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.micro_batches:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        # The plain module's state: the same on every rank, loadable on any world size.
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_checkpoint(self, directory: Path, loop_state: dict, step: int, keep: int) -> Path:
        store = CheckpointStore(directory, keep=keep)
        if self.is_main:
            store.save({"engine": self.state_dict(), **loop_state}, step)
        self.barrier()
        return store.last

    def load_checkpoint(self, directory: Path, log) -> dict | None:
        state = CheckpointStore(directory).load_latest(log=log)
        if state is not None:
            self.load_state_dict(state.pop("engine"))
        return state

"""PyTorch DistributedDataParallel behind the engine interface (plain module on one process)."""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from .base import Engine


class DDPEngine(Engine):
    def wrap(self, model, optimizer, scheduler, find_unused_parameters: bool = False) -> None:
        if self.world_size > 1 and self.cfg.sync_bn:
            if self.device.type != "cuda":
                raise ValueError("engine.sync_bn=true needs GPUs: torch's SyncBatchNorm has no CPU implementation")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.raw = model
        self.optimizer, self.scheduler = optimizer, scheduler
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
        else:
            self.module = model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, grad_clip: float = 0.0) -> None:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), grad_clip)
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

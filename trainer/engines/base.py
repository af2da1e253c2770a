"""The engine interface: the only thing the training loop knows about distribution.

An engine owns the process group, wraps the one module with its optimizer
and schedule, runs backward and the optimizer step, exposes its state for
checkpoints, and reduces metrics. DDP implements it now; DeepSpeed plugs in
behind the same methods.
"""
from __future__ import annotations

import contextlib
import datetime
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from ..distributed import DistEnv


class Engine(ABC):
    def __init__(self, cfg: DictConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.rank, self.world_size = env.rank, env.world_size
        want = cfg.device
        cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is visible")
        self.device = torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.channels_last = cuda if cfg.channels_last is None else bool(cfg.channels_last)
        self.module = None      # what the loop calls: possibly a wrapper
        self.raw = None         # the plain module (for state dicts and export)
        self.optimizer = None
        self.scheduler = None
        self._control_group = None
        if self.world_size > 1 and not dist.is_initialized():
            self._init_process_group()

    # process group -------------------------------------------------------
    def _backend(self) -> str:
        if self.cfg.backend != "auto":
            return self.cfg.backend
        return "nccl" if self.device.type == "cuda" else "gloo"

    def _init_process_group(self) -> None:
        dist.init_process_group(self._backend(), init_method=f"tcp://{self.env.master_addr}:{self.env.master_port}",
                                rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(minutes=30))
        # Control messages (the per-step stop vote) go over gloo on the CPU: a CUDA all-reduce read
        # back on the host would stall the GPU queue every step.
        self._control_group = dist.new_group(backend="gloo") if self._backend() != "gloo" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place; returned for convenience)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (a collective: every rank must call it)."""
        if self.world_size == 1:
            return flag
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._control_group)
        return bool(vote.item())

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # training ------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device (and memory format) before optimizers see the parameters."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    @abstractmethod
    def wrap(self, model: torch.nn.Module, optimizer, scheduler, find_unused_parameters: bool = False) -> None:
        """Take ownership of the (prepared) module, its optimizer and its per-step schedule.

        `find_unused_parameters`: some steps leave trainable parameters out of the forward; their
        gradient must then stay unset (not zero) so that the optimizer skips them.
        """

    def unwrap(self) -> None:
        """Drop the wrapped module, optimizer and schedule (and the memory they hold) after training."""
        self.module = self.raw = self.optimizer = self.scheduler = None

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, grad_clip: float = 0.0) -> None:
        """Optimizer step, schedule step, gradients cleared."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Model, optimizer and schedule state, independent of the number of processes."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

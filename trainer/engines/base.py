"""The engine interface: the only thing the training loop knows about distribution.

An engine owns the process group, wraps the one module with its optimizer
and schedule, runs backward and the optimizer step, exposes its state for
checkpoints, and reduces metrics. DDP (`ddp.py`) and DeepSpeed ZeRO
(`deepspeed.py`) implement it.

Gradient accumulation lives here too: the loop splits each batch into
`micro_batches` chunks, runs forward and `backward` on each inside
`micro_step(last)`, and calls `step` after every chunk; the engine only
updates the weights after the last one.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from ..distributed import DistEnv, check_multi_node_network, rendezvous_line

# The process group lives as long as the process: a local sweep under torchrun runs its points one after
# another in the same processes, and destroying and re-creating the group between them races (a process
# that finished first reconnects to the other's old rendezvous and is reset; seen in tests/test_methods.py).
_CONTROL_GROUP: list = [None]   # the gloo group of control messages (None: the default group is gloo)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# What says that this process was given GPUs: SLURM's variables in a job with GPUs, CUDA's own mask.
_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")


def gpus_requested(environ=None) -> str | None:
    """`NAME=value` of the first variable that says this process was given GPUs, or None."""
    env = os.environ if environ is None else environ
    for key in _GPU_VARIABLES:
        value = env.get(key, "").strip()
        # "" and "-1" hide every GPU; SLURM writes NoDevFiles (or a count of 0) when the job has none
        if value not in ("", "-1", "NoDevFiles") and not (key == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"{key}={value}"
    return None


def no_gpu_error(reason: str) -> RuntimeError:
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        why = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} and needs an NVIDIA driver that "
               f"supports CUDA {torch.version.cuda} or newer (`nvidia-smi` shows the driver's CUDA version; "
               f"docs/install.md)")
    return RuntimeError(f"{reason}, but torch sees no GPU: {why}. Update the driver or install a torch build for "
                        f"the driver's CUDA version; engine.device=cpu trains on the CPU on purpose")


def cuda_index(local_rank: int | None, visible: int) -> int:
    """This process's GPU among the `visible` ones. The one rule for both engines (DeepSpeed gets it as LOCAL_RANK)."""
    if visible == 1:
        return 0  # one GPU per process (SLURM binds one per task, or CUDA_VISIBLE_DEVICES per process)
    if local_rank is None:
        raise RuntimeError(f"RANK and WORLD_SIZE are set but neither LOCAL_RANK nor SLURM_LOCALID: which of the "
                           f"{visible} GPUs this process should use is unknown; set LOCAL_RANK (torchrun does)")
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank}, but only {visible} GPUs are visible: start one process per "
                           f"GPU (cluster.tasks_per_node at most cluster.gpus_per_node)")
    return local_rank


def pick_device(want: str, local_rank: int | None, environ=None) -> torch.device:
    """The device for engine.device (auto, cpu or cuda). No GPU where one was asked for is an error, not a
    silent CPU run: a driver too old for the wheel's CUDA makes `cuda.is_available()` false."""
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        asked = "engine.device=cuda" if want == "cuda" else gpus_requested(environ)
        if asked:
            raise no_gpu_error(asked if want == "cuda" else f"this job was given GPUs ({asked})")
        return torch.device("cpu")
    return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))


def device_line(rank: int, world_size: int, device: torch.device) -> str:
    """One line per process at start: which device it trains on, and where."""
    what = f"{device} ({torch.cuda.get_device_name(device)}, " if device.type == "cuda" else f"{device} ("
    return f"rank {rank}/{world_size} on {what}host {socket.gethostname()})"


class Engine(ABC):
    def __init__(self, cfg: DictConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.rank, self.world_size = env.rank, env.world_size
        self.device = pick_device(cfg.device, env.local_rank)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
            # Training shapes are static (drop_last), so cuDNN's timed choice of algorithms pays off. GPU runs
            # are not bitwise reproducible anyway (atomic adds in convolution backward); CPU runs stay so.
            torch.backends.cudnn.benchmark = True
        print(device_line(self.rank, self.world_size, self.device), flush=True)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self.channels_last = cuda if cfg.channels_last is None else bool(cfg.channels_last)
        self.module = None      # what the loop calls: possibly a wrapper
        self.raw = None         # the plain module (for state dicts and export)
        self.optimizer = None
        self.scheduler = None
        self._control_group = None
        self.micro_batches = int(cfg.get("grad_accum_steps", 1))
        if self.world_size > 1 and not dist.is_initialized():
            self._init_process_group()
        self._control_group = _CONTROL_GROUP[0]

    # process group -------------------------------------------------------
    def _backend(self) -> str:
        if self.cfg.backend != "auto":
            return self.cfg.backend
        return "nccl" if self.device.type == "cuda" else "gloo"

    def _init_process_group(self) -> None:
        check_multi_node_network(self.env)
        print(rendezvous_line(self.env), flush=True)
        dist.init_process_group(self._backend(), init_method=f"tcp://{self.env.master_addr}:{self.env.master_port}",
                                rank=self.rank, world_size=self.world_size,
                                timeout=datetime.timedelta(minutes=30))
        # Control messages (the per-step stop vote) go over gloo on the CPU: a CUDA all-reduce read
        # back on the host would stall the GPU queue every step.
        _CONTROL_GROUP[0] = dist.new_group(backend="gloo") if self._backend() != "gloo" else None
        atexit.register(_destroy_process_group)

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

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum over processes of a small CPU tensor (in place), over the CPU control group."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._control_group)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (a collective: every rank must call it)."""
        if self.world_size == 1:
            return flag
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._control_group)
        return bool(vote.item())

    def any_rank_async(self, flag: bool):
        """`any_rank` without waiting (several processes): (work, vote); after work.wait(), vote holds the answer."""
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        return dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._control_group, async_op=True), vote

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """The end of a run. The process group stays for the process's next run (and ends with it)."""

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
    def wrap(self, model: torch.nn.Module, optimizer, scheduler, *, batch_size: int, grad_clip: float = 0.0,
             find_unused_parameters: bool = False) -> None:
        """Take ownership of the (prepared) module, its optimizer, its per-step schedule and clipping.

        `batch_size`: images per process per optimizer step (split into `micro_batches` chunks).
        `find_unused_parameters`: some steps leave trainable parameters out of the forward; their
        gradient must then stay unset (not zero) so that the optimizer skips them.
        """

    def split(self, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """The micro-batches of one batch (equal chunks; `wrap` checked the batch divides)."""
        return list(zip(*(t.chunk(self.micro_batches) for t in tensors)))

    def micro_step(self, last: bool):
        """Context for one micro-batch's forward and backward (DDP skips its all-reduce until the last)."""
        return contextlib.nullcontext()

    def _check_batch(self, batch_size: int) -> None:
        if self.micro_batches < 1 or batch_size % self.micro_batches:
            raise ValueError(f"engine.grad_accum_steps={self.micro_batches} must divide the {batch_size} images "
                             f"each process gets per step (data.batch_size / processes)")

    @property
    def forward_has_collectives(self) -> bool:
        """True when every forward of the plain module talks to the other processes (ZeRO-3's gathers)."""
        return False

    def unwrap(self) -> None:
        """Drop the wrapped module, optimizer and schedule (and the memory they hold) after training."""
        self.module = self.raw = self.optimizer = self.scheduler = None

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> None:
        """After every micro-batch; on the last: clip, optimizer step, schedule step, gradients cleared."""

    # checkpoints -----------------------------------------------------------
    @abstractmethod
    def save_checkpoint(self, directory: Path, loop_state: dict, step: int, keep: int) -> Path:
        """Save the wrapped state and `loop_state` under `directory` (a collective: every rank calls it).

        A torn write never replaces the newest good checkpoint. Returns the checkpoint's path.
        """

    @abstractmethod
    def load_checkpoint(self, directory: Path, log) -> dict | None:
        """Restore the newest readable checkpoint in `directory`; its `loop_state` (plus `_path`), or None."""

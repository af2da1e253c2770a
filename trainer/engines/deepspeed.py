"""DeepSpeed ZeRO (stage 1, 2 or 3) behind the engine interface.

The wrapped module is the same single module as under DDP (backbone +
prompt + hypernetwork or scores), so ZeRO partitions the hypernetwork, the
prompt and the scores, and their optimizer state, like any other parameter.
The optimizer and the per-step schedule are the project's own (torch
optimizers, built from the stage's config) handed to `deepspeed.initialize`;
no DeepSpeed JSON is kept next to the config. Mixed precision is torch
autocast (DeepSpeed's `torch_autocast`): fp32 master parameters, bf16
compute, as under DDP. `engine.config` merges further DeepSpeed keys.

ZeRO-3 keeps only a shard of every parameter between forwards. The loop
only ever calls the wrapped module; whatever needs whole parameters outside a
forward (evaluation of the plain module, PASS extraction, VPNs masks after
search, the stage's products) runs after `unwrap`, which gathers every
parameter back into the plain module (`deepspeed.zero.GatheredParameters`) and
removes DeepSpeed's hooks and attributes from it.

Checkpoints are DeepSpeed's (`save_checkpoint`: one file per rank) in
`checkpoints/step-<step>/`, with the loop's state as DeepSpeed client state;
see `ds_checkpoint.py` for how torn writes are kept from being trusted and how
a run resumes on another number of processes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from . import ds_checkpoint
from .base import Engine


def import_deepspeed(cpu: bool):
    """DeepSpeed, set up so that nothing needs compiling on a CPU-only machine."""
    import deepspeed
    import deepspeed.ops
    if cpu:
        # Its CPU accelerator would JIT-compile a shared-memory all-reduce (needs g++); gloo does without.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedEngine(Engine):
    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        if cfg.zero_stage not in (1, 2, 3):
            raise ValueError(f"engine.zero_stage={cfg.zero_stage}: choose 1, 2 or 3")
        if cfg.sync_bn:
            raise ValueError("engine.sync_bn is a DDP option; DeepSpeed keeps per-process BatchNorm statistics")
        if not dist.is_initialized():
            # DeepSpeed always talks through a process group; one process gets a private one.
            dist.init_process_group(self._backend(), store=dist.HashStore(), rank=0, world_size=1)
        os.environ.update(deepspeed_env(self.device, env, os.environ))
        self.deepspeed = import_deepspeed(cpu=self.device.type == "cpu")
        self.zero_stage = int(cfg.zero_stage)
        self._ds = None
        self._param_attrs: dict[int, set] = {}

    @property
    def forward_has_collectives(self) -> bool:
        return self._ds is not None and self.zero_stage == 3 and self.world_size > 1

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # the DeepSpeed config, from the project's ---------------------------------
    def ds_config(self, batch_size: int, grad_clip: float) -> dict:
        # Buckets of 5e7 values (200 MB in fp32) instead of DeepSpeed's 5e8: its defaults cost ~4 GB per
        # process in fp32 buckets alone, more than these models' whole state (docs/deepspeed.md).
        zero = {"stage": self.zero_stage, "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)}
        if self.zero_stage == 3:
            # save_16bit_model / consolidated state dicts gather the full weights on rank 0
            zero["stage3_gather_16bit_weights_on_model_save"] = True
            zero["stage3_prefetch_bucket_size"] = int(5e7)
        config = {
            "train_micro_batch_size_per_gpu": batch_size // self.micro_batches,
            "gradient_accumulation_steps": self.micro_batches,
            "train_batch_size": batch_size * self.world_size,
            "gradient_clipping": float(grad_clip),
            "zero_optimization": zero,
            # the project's torch optimizers (SGD, Adam, AdamW); DeepSpeed's fused ones would need compiling
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2 ** 31 - 1,
            "wall_clock_breakdown": False,
        }
        if self.autocast_dtype is not None:
            # No module's gradients are reduced in bf16: DeepSpeed's default list (Linear, Conv) would take
            # in the VPNs scores and the hypernetwork's layers, and ZeRO would then search differently from DDP,
            # which all-reduces fp32 gradients. Under torch_autocast the list alone decides the reduction dtype.
            config["torch_autocast"] = {"enabled": True, "dtype": "torch.bfloat16", "lower_precision_safe_modules": []}
        config["communication_data_type"] = "fp32"  # the same without autocast (DeepSpeed's default follows bf16)
        extra = OmegaConf.to_container(self.cfg.config, resolve=True) if self.cfg.get("config") else {}
        return _merge(config, extra)

    # training -----------------------------------------------------------------
    def wrap(self, model, optimizer, scheduler, *, batch_size: int, grad_clip: float = 0.0,
             find_unused_parameters: bool = False) -> None:
        self._check_batch(batch_size)
        self.raw = model
        # What each parameter carried before ZeRO-3 decorated it, so that unwrap can strip the rest.
        self._param_attrs = {id(p): set(vars(p)) for p in model.parameters()}
        self._ds, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=self.ds_config(batch_size, grad_clip), dist_init_required=False)
        self.module = self._ds
        if self.zero_stage == 3:
            _run_gathers_first(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
            held = sum(p.ds_tensor.numel() for p in trainable)
            # every rank says what it holds: the shard sizes show that ZeRO-3 really partitions
            print(f"deepspeed: ZeRO-3 rank {self.rank} holds {held:,} of the {sum(p.ds_numel for p in trainable):,} "
                  f"trainable parameter values", flush=True)

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)   # scales by 1/grad_accum_steps itself

    def step(self) -> None:
        self._ds.step()           # steps the optimizer and schedule only at the accumulation boundary

    def unwrap(self) -> None:
        if self._ds is not None:
            model = self.raw
            if self.zero_stage == 3:
                params = list(model.parameters())
                with self.deepspeed.zero.GatheredParameters(params):
                    whole = [p.data.clone() for p in params]
            self._ds.destroy()
            if self.zero_stage == 3:
                for p, data in zip(params, whole):
                    for attr in set(vars(p)) - self._param_attrs.get(id(p), set()):
                        delattr(p, attr)
                    p.data = data
                _plain_parameter_dicts(model)
            self._ds = None
        super().unwrap()

    # checkpoints -----------------------------------------------------------
    def save_checkpoint(self, directory: Path, loop_state: dict, step: int, keep: int) -> Path:
        return ds_checkpoint.save(self, Path(directory), loop_state, step, keep)

    def load_checkpoint(self, directory: Path, log) -> dict | None:
        return ds_checkpoint.load(self, Path(directory), log)


def deepspeed_env(device: torch.device, env, environ) -> dict:
    """The torchrun variables DeepSpeed reads (one process or srun tasks do not set them). On a GPU, LOCAL_RANK
    is the index of this process's GPU, the DDP engine's choice (`cuda_index`): DeepSpeed takes its device from
    LOCAL_RANK alone, which is not the GPU's index when each task sees only its own GPU."""
    out = {key: environ.get(key, str(value)) for key, value in
           (("LOCAL_RANK", env.local_rank or 0), ("RANK", env.rank), ("WORLD_SIZE", env.world_size))}
    if device.type == "cuda":
        out["LOCAL_RANK"] = str(device.index)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _run_gathers_first(model: torch.nn.Module) -> None:
    """Order every module's pre-forward hooks so that ZeRO-3's parameter gather runs before the project's.

    Hooks run in registration order and DeepSpeed registers its own last, at wrap time; hooks that
    read a module's weights before its forward (VPNs' masked-weight substitution) need them gathered.
    """
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, fn in hooks.items() if not _is_deepspeed(fn)]:
            hooks.move_to_end(key)


def _is_deepspeed(fn) -> bool:
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__module__", "").startswith("deepspeed")


def _plain_parameter_dicts(model: torch.nn.Module) -> None:
    """Give modules back an ordinary `_parameters` dict (ZeRO-3 swaps in one that gathers on access)."""
    for module in model.modules():
        if type(module._parameters).__module__.startswith("deepspeed"):
            module._parameters = dict(module._parameters)
        for attr in [a for a in vars(module) if a.startswith(("ds_", "_ds_"))]:
            delattr(module, attr)

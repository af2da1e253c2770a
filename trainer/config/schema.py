"""Typed schema of every configuration key.

The dataclasses below are the single source of truth for which keys exist,
their types and defaults. `load.py` builds an omegaconf structured config from
them, so a misspelled key or a value of the wrong type is rejected before any
work starts. `help` metadata feeds `launch.py --help`. Values that must come
from a fixed set are listed in CHOICES and checked in `validate.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from pruning.methods import STRUCTURED, UNSTRUCTURED, method_names, section_choices, sections, setting

GROUPS = ("model", "data", "method", "engine", "cluster")
STAGES = ("dense", "search", "finetune", "eval", "all")
# Launcher commands that act on submitted jobs instead of training (stage=status run=<run or sweep>).
JOB_COMMANDS = ("status", "cancel", "report")
CLUSTERS = ("local", "slurm", "debug")


_f = setting  # a field with its help line, the same helper the methods' sections use


@dataclass
class ModelConfig:
    name: str = _f("resnet18", "architecture (set by the model= group)")
    weights: Optional[str] = _f(None, "none, a torchvision weights name (IMAGENET1K_V1, DEFAULT, ...) or a checkpoint path")


@dataclass
class DataConfig:
    name: str = _f("synthetic", "dataset kind (set by the data= group)")
    train_dir: Optional[str] = _f(None, "ImageFolder training tree (data=imagefolder|imagenet)")
    val_dir: Optional[str] = _f(None, "ImageFolder validation tree; without it a seeded per-class split is carved from train_dir")
    split_seed: int = _f(0, "seed of the carved validation split (kept apart from `seed` so the split stays fixed)")
    val_fraction: float = _f(0.1, "fraction of each class carved out for validation when val_dir is not given")
    train_per_class: Optional[int] = _f(None, "ImageFolder: train on at most this many images per class (a seeded "
                                                 "choice after the split; none: all). For small protocols")
    val_per_class: Optional[int] = _f(None, "ImageFolder: evaluate on at most this many images per class (none: all)")
    empty_classes: str = _f("error", "ImageFolder: a class folder without images stops the run (error, naming it) or "
                                     "is left out (skip)")
    bad_images: str = _f("error", "ImageFolder: a file that cannot be decoded stops the write (error, naming it) or, "
                                  "found by decoding every image first, is left out and listed in the beton's "
                                  "manifest (skip)")
    wait_minutes: float = _f(720, "how long the other processes of a job wait for the main one to write the .beton "
                                  "cache (they poll for it, outside any collective; ImageNet takes hours)")
    res: int = _f(32, "training and evaluation resolution in pixels")
    val_crop_ratio: float = _f(0.875, "center-crop side / shorter image side at evaluation (224/256)")
    augment: bool = _f(True, "random-resized-crop + flip for training (false: the evaluation center crop)")
    min_crop_scale: float = _f(0.35, "lower bound of the random-resized-crop area fraction (upper bound is 1)")
    batch_size: int = _f(128, "GLOBAL batch size, split evenly over the processes")
    num_workers: int = _f(2, "FFCV decoding threads per process")
    write_workers: Optional[int] = _f(None, "processes that write the .beton cache and check images (none: every "
                                            "core this process may run on, e.g. SLURM's cpus_per_task)")
    jit: bool = _f(True, "numba-compile FFCV's decoding (GIL-free threads; ~8 s per loader to compile). false: the "
                         "same batches decoded in plain Python, no compile: for tiny images and tests")
    beton_dir: str = _f("~/.cache/vp-prune/betons", "where .beton files are written and cached")
    write_mode: str = _f("raw", "FFCV image storage: raw, jpg, smart or proportion")
    max_resolution: Optional[int] = _f(None, "resize so the longer side is at most this when writing (none keeps size)")
    jpeg_quality: int = _f(90, "JPEG quality when writing compressed images")
    compress_probability: float = _f(0.5, "fraction of images stored as JPEG with write_mode=proportion")
    synthetic_train_size: int = _f(6000, "images in the synthetic training split")
    synthetic_val_size: int = _f(1000, "images in the synthetic validation split")
    synthetic_image_size: int = _f(48, "side of the generated synthetic images")
    synthetic_seed: int = _f(0, "seed the synthetic images are generated from (val uses a derived seed)")
    num_classes: Optional[int] = _f(None, "synthetic only: number of classes (default 10)")


@dataclass
class MethodConfig:
    name: str = _f("dense", "pruning method (set by the method= group)")


@dataclass
class EngineConfig:
    name: str = _f("ddp", "distributed engine (set by the engine= group)")
    backend: str = _f("auto", "process-group backend: auto (nccl on GPU, gloo on CPU), gloo or nccl")
    precision: str = _f("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    channels_last: Optional[bool] = _f(None, "channels_last memory format; null: on GPU only")
    sync_bn: bool = _f(False, "convert BatchNorm to SyncBatchNorm when several processes train")
    device: str = _f("auto", "auto, cpu or cuda")
    grad_accum_steps: int = _f(1, "split each process's batch into this many micro-batches, one optimizer step per batch")
    zero_stage: int = _f(2, "engine=deepspeed: ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters)")
    config: Dict[str, Any] = _f({}, "engine=deepspeed: further DeepSpeed config keys, merged over the generated ones, "
                                    "e.g. engine.config.zero_optimization.offload_optimizer.device=cpu")


@dataclass
class ClusterConfig:
    name: str = _f("local", "local: run here (torchrun for several processes); slurm: submit with submitit; "
                            "debug: run the submitit job object in this process (set by the cluster= group)")
    partition: Optional[str] = _f(None, "slurm partition (null: the cluster's default)")
    account: Optional[str] = _f(None, "slurm account to charge")
    qos: Optional[str] = _f(None, "slurm quality of service")
    constraint: Optional[str] = _f(None, "slurm node feature constraint, e.g. a100|h100")
    nodes: int = _f(1, "nodes per job")
    gpus_per_node: int = _f(0, "GPUs per node; one task (process) is started per GPU")
    tasks_per_node: Optional[int] = _f(None, "processes per node (null: gpus_per_node, or 1 without GPUs)")
    cpus_per_task: int = _f(8, "CPU cores per process (FFCV decoding threads run on these)")
    mem_gb: Optional[float] = _f(None, "memory per node in GB (null: the partition's default)")
    timeout_min: int = _f(1440, "time limit of each job in minutes; at the limit the job checkpoints and requeues")
    signal_delay_s: int = _f(120, "seconds before preemption/time limit at which SLURM signals the job to checkpoint")
    max_timeouts: int = _f(3, "requeues allowed after hitting the time limit (preemptions requeue without limit)")
    array_parallelism: int = _f(64, "sweeps: array tasks allowed to run at once")
    job_name: Optional[str] = _f(None, "job name prefix (null: the run name)")
    extra_sbatch: Dict[str, Any] = _f({}, "further sbatch options, e.g. cluster.extra_sbatch={exclusive: true, mail-type: END}")
    setup: List[str] = _f([], "shell lines run in the job script before the processes start, e.g. ['module load cuda']")


# The methods, their families and their own config sections come from the registry (pruning/methods: torch-free
# to import, like this module).
STRUCTURED_METHODS = method_names(STRUCTURED)
UNSTRUCTURED_METHODS = method_names(UNSTRUCTURED)
# The same set as pruning.prompt.PROMPT_VARIANTS, restated so the config layer stays free of torch (--help and
# print_config start fast); tests/test_config.py checks they agree.
PROMPT_VARIANTS = ("pad", "expand", "full")
HEADS = ("auto", "keep", "map", "new")


@dataclass
class PruningConfig:
    flops_ratio: float = _f(0.5, "structured methods: kept FLOPs / dense FLOPs")
    density: float = _f(0.1, "unstructured methods: kept weights / all scored weights")
    residual: bool = _f(True, "also prune residual streams (ResNet stage widths, ViT embedding width)")
    min_keep: float = _f(0.05, "every group keeps at least max(1, ceil(min_keep * channels))")
    round_to: int = _f(1, "round kept channel counts to a multiple of this (8 for GPU-friendly widths)")


@dataclass
class PromptConfig:
    variant: str = _f("pad", "pad (frame over the image), expand (image shrunk inside the frame) or full")
    pad: Optional[int] = _f(None, "frame width in pixels (null: round(16 * res / 224))")
    headline: str = _f("prompt", "which accuracy summaries call top1: prompt or no_prompt")


@dataclass
class ScheduleConfig:
    epochs: int = _f(8, "training epochs of this stage")
    lr: float = _f(0.1, "peak learning rate")
    optimizer: str = _f("sgd", "sgd, adam (L2 weight decay) or adamw (decoupled weight decay)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum for SGD")
    weight_decay: float = _f(5e-4, "weight decay")
    schedule: str = _f("cosine", "learning-rate schedule: cosine, step or constant")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs (fractions allowed)")
    step_size: int = _f(30, "schedule=step: epochs between 10x decays")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float = _f(0.0, "clip the gradient norm to this (0 disables)")


@dataclass
class FinetuneConfig(ScheduleConfig):
    prompt: bool = _f(True, "train a visual prompt with the pruned network (PASS: starts from the searched one)")


def _schedule(kind=ScheduleConfig, **kw):
    return field(default_factory=lambda: kind(**kw), metadata={"help": ""})


@dataclass
class CheckpointConfig:
    every_steps: int = _f(500, "also checkpoint every N optimizer steps (0: only at epoch ends)")
    keep: int = _f(2, "older checkpoints kept besides last.pt (fallbacks if last.pt is damaged)")


@dataclass
class LogConfig:
    every_steps: int = _f(50, "write a train record to metrics.jsonl every N steps")
    progress: bool = _f(True, "tqdm progress bars on rank 0")


@dataclass
class RootConfig:
    stage: str = _f("all", "dense | search | finetune | eval | all; status | cancel act on a run's or sweep's jobs; "
                           "report writes <run or sweep>/report/report.md and its plots")
    run: Optional[str] = _f(None, "run name: runs/<run>/ (default: derived from the groups and overrides)")
    runs_dir: str = _f("runs", "parent directory of run directories")
    seed: int = _f(0, "seed for initialisation, data order and augmentation")
    resume: str = _f("auto", "auto: continue from the last good checkpoint; never: start a fresh run named <run>-<timestamp>")
    print_config: bool = _f(False, "print the resolved config and exit")
    dense_run: Optional[str] = _f(None, "prune the dense network trained by this other run (its directory, or a run "
                                        "name under runs_dir) instead of training one; a sweep sets it to its shared "
                                        "dense run")
    logger: str = _f("jsonl", "jsonl: metrics.jsonl only; tensorboard: also TensorBoard event files in <stage>/tensorboard/")
    head: str = _f("auto", "the classifier pruning starts from, for weights trained on other classes: map (frequency "
                           "label mapping), new (a fresh head, trained in search); keep: as stored (equal sizes); "
                           "auto: keep when sizes agree, else map for torchvision weights and new otherwise")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    dense: ScheduleConfig = _schedule(epochs=8, lr=0.1, optimizer="sgd", weight_decay=5e-4)
    search: ScheduleConfig = _schedule(epochs=3, lr=1e-3, optimizer="adamw", weight_decay=1e-2)
    finetune: FinetuneConfig = _schedule(FinetuneConfig, epochs=5, lr=0.01, optimizer="sgd", weight_decay=1e-4)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Keys whose value must be one of a fixed set (checked after merging).
_SCHEDULE_CHOICES = {"optimizer": ("sgd", "adam", "adamw"), "schedule": ("cosine", "step", "constant")}
CHOICES = {
    "stage": STAGES + JOB_COMMANDS,
    "cluster.name": CLUSTERS,
    "resume": ("auto", "never"),
    "logger": ("jsonl", "tensorboard"),
    "engine.backend": ("auto", "gloo", "nccl"),
    "engine.precision": ("auto", "bf16", "fp32"),
    "engine.device": ("auto", "cpu", "cuda"),
    "engine.name": ("ddp", "deepspeed"),
    "engine.zero_stage": (1, 2, 3),
    "data.write_mode": ("raw", "jpg", "smart", "proportion"),
    "data.empty_classes": ("error", "skip"),
    "data.bad_images": ("error", "skip"),
    "prompt.variant": PROMPT_VARIANTS,
    "prompt.headline": ("prompt", "no_prompt"),
    **section_choices(),   # the methods' own settings (pass.budget_loss, vpns.threshold, ...)
    "head": HEADS,
    **{f"{s}.{k}": v for s in ("dense", "search", "finetune") for k, v in _SCHEDULE_CHOICES.items()},
}


# The methods' own sections (`pass.*`, `vpns.*`, ...), declared by each method's module; added to the
# structured config by name (a section may be named like a Python keyword, so it cannot be a dataclass field).
METHOD_SECTIONS = sections()


def root_config() -> DictConfig:
    """The structured config with every schema default (RootConfig plus the methods' sections)."""
    cfg = OmegaConf.structured(RootConfig)
    with open_dict(cfg):
        for name, section in METHOD_SECTIONS.items():
            cfg[name] = OmegaConf.structured(section)
    return cfg

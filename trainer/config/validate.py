"""Value checks that a type alone cannot express: choices, ranges, required paths.

Run once on the composed config, before any data is written or model built.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pruning.methods import registered

from ..image_files import IMAGE_SUFFIXES, has_an_image
from .load import ConfigError
from .schema import CHOICES

_IMAGEFOLDER_KINDS = ("imagefolder", "imagenet")
# = trainer.data.synthetic.MAX_CLASSES (a test checks); importing it here would load FFCV and torch.
MAX_SYNTHETIC_CLASSES = 128
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        _require(value in allowed, f"{key}={value} is not allowed; choose from: {', '.join(map(str, allowed))}")

    _require(cfg.engine.grad_accum_steps >= 1,
             f"engine.grad_accum_steps={cfg.engine.grad_accum_steps}: must be at least 1")
    d = cfg.data
    _require(d.res >= 16, f"data.res={d.res}: must be at least 16")
    _require(d.batch_size >= 1, f"data.batch_size={d.batch_size}: must be at least 1")
    _require(d.num_workers >= 1, f"data.num_workers={d.num_workers}: must be at least 1")
    _require(d.write_workers is None or d.write_workers >= 1,
             f"data.write_workers={d.write_workers}: must be at least 1 (or null: every core)")
    _require(d.wait_minutes > 0, f"data.wait_minutes={d.wait_minutes}: must be positive")
    _require(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction}: must be in (0, 1)")
    _require(0 < d.val_crop_ratio <= 1, f"data.val_crop_ratio={d.val_crop_ratio}: must be in (0, 1]")
    _require(0 < d.min_crop_scale <= 1, f"data.min_crop_scale={d.min_crop_scale}: must be in (0, 1]")
    _require(1 <= d.jpeg_quality <= 100, f"data.jpeg_quality={d.jpeg_quality}: must be in [1, 100]")
    _require(0 <= d.compress_probability <= 1, f"data.compress_probability={d.compress_probability}: must be in [0, 1]")
    if d.name == "synthetic":
        _require(d.synthetic_train_size >= 10, "data.synthetic_train_size: must be at least 10")
        _require(d.synthetic_val_size >= 10, "data.synthetic_val_size: must be at least 10")
        _require(d.synthetic_image_size >= 16, "data.synthetic_image_size: must be at least 16")
        _require(d.num_classes is None or 2 <= d.num_classes <= MAX_SYNTHETIC_CLASSES,
                 f"data.num_classes={d.num_classes}: must be in [2, {MAX_SYNTHETIC_CLASSES}]")
    else:
        _require(d.num_classes is None, "data.num_classes only applies to data=synthetic "
                 "(an ImageFolder's classes are its sub-folders)")
    for key in ("train_per_class", "val_per_class"):
        _require(d[key] is None or (d.name in _IMAGEFOLDER_KINDS and d[key] >= 1),
                 f"data.{key}={d[key]}: must be at least 1, and only applies to ImageFolder data")
    if d.name in _IMAGEFOLDER_KINDS:
        _require(d.train_dir is not None, f"data.train_dir is required for data={d.name} (set data.train_dir=<path>)")
        for key in ("train_dir", "val_dir"):
            value = d[key]
            if value is None:
                continue
            path = Path(value).expanduser()
            _require(path.is_dir(), f"data.{key}={value}: no such directory")
            _require(has_an_image(path), f"data.{key}={value}: no images found "
                     f"(expected {value}/<class>/<image> with one of {', '.join(IMAGE_SUFFIXES)})")

    for stage in ("dense", "search", "finetune"):
        s = cfg[stage]
        _require(s.epochs >= 0, f"{stage}.epochs={s.epochs}: must be 0 or more")
        _require(s.lr > 0, f"{stage}.lr={s.lr}: must be positive")
        _require(s.weight_decay >= 0, f"{stage}.weight_decay={s.weight_decay}: must be 0 or more")
        _require(0 <= s.label_smoothing < 1, f"{stage}.label_smoothing={s.label_smoothing}: must be in [0, 1)")
        _require(s.warmup_epochs >= 0, f"{stage}.warmup_epochs={s.warmup_epochs}: must be 0 or more")
        _require(s.step_size >= 1, f"{stage}.step_size={s.step_size}: must be at least 1")
        _require(s.grad_clip >= 0, f"{stage}.grad_clip={s.grad_clip}: must be 0 or more")

    p = cfg.pruning
    _require(0 < p.flops_ratio <= 1, f"pruning.flops_ratio={p.flops_ratio}: must be in (0, 1]")
    _require(0 < p.density <= 1, f"pruning.density={p.density}: must be in (0, 1]")
    _require(0 <= p.min_keep <= 1, f"pruning.min_keep={p.min_keep}: must be in [0, 1]")
    _require(p.round_to >= 1, f"pruning.round_to={p.round_to}: must be a positive integer")
    pad = cfg.prompt.pad
    _require(pad is None or (pad > 0 and 2 * pad < cfg.data.res),
             f"prompt.pad={pad}: the frame must be at least 1 pixel wide and fit a {cfg.data.res}px input")
    c = cfg.cluster  # checked here, before anything is submitted (sbatch's own errors are long and late)
    for key, low in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("timeout_min", 1),
                     ("signal_delay_s", 0), ("max_timeouts", 0), ("array_parallelism", 1)):
        _require(c[key] >= low, f"cluster.{key}={c[key]}: must be at least {low}")
    _require(c.tasks_per_node is None or c.tasks_per_node >= 1,
             f"cluster.tasks_per_node={c.tasks_per_node}: must be at least 1 (or null)")
    _require(c.mem_gb is None or c.mem_gb > 0, f"cluster.mem_gb={c.mem_gb}: must be positive (or null)")
    _require(c.signal_delay_s < 60 * c.timeout_min,
             f"cluster.signal_delay_s={c.signal_delay_s}: must be shorter than cluster.timeout_min={c.timeout_min} "
             f"minutes, or the job is signalled before it starts")
    for method in registered().values():  # every method checks its own section
        for problem in method().problems(cfg):
            raise ConfigError(problem)
    _require(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps: must be 0 or more")
    _require(cfg.checkpoint.keep >= 0, "checkpoint.keep: must be 0 or more")
    _require(cfg.log.every_steps >= 1, "log.every_steps: must be at least 1")

    weights = cfg.model.weights
    if weights and weights.lower() != "none":
        looks_like_path = "/" in weights or weights.endswith(_CHECKPOINT_SUFFIXES)
        _require(not looks_like_path or Path(weights).expanduser().is_file(),
                 f"model.weights={weights}: no such file")
    _require(not (cfg.dense_run and weights and weights.lower() != "none"),
             f"dense_run={cfg.dense_run} and model.weights={weights}: give one source of the dense network")
    _require(bool(cfg.run) and "/" not in cfg.run and cfg.run not in (".", ".."),
             f"run={cfg.run}: must be a plain directory name")

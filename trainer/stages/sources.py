"""What the pruning stages share: which methods they serve, the dense network, a fresh prompt."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from pruning.prompt import PadPrompt

from ..data import DataFiles
from ..loop import evaluate
from ..models import build_backbone, has_weights
from ..plan import pruning_method_problem
from ..run_dir import RunDir
from .context import StageContext, StageNotImplemented
from .product import PRODUCT_FILE, load_product


def require_pruning_method(method: str, stage: str) -> None:
    """The search/finetune stages serve the structured and the unstructured pruning methods."""
    problem = pruning_method_problem(method, stage)
    if problem:
        raise StageNotImplemented(problem)


def same_on_every_rank(engine, masks: list[torch.Tensor], what: str) -> list[str]:
    """Every process's digest of `masks`; raises if the processes' decisions differ."""
    digest = hashlib.sha256(b"".join(m.detach().cpu().contiguous().numpy().tobytes() for m in masks)).hexdigest()[:16]
    digests = [digest]
    if engine.world_size > 1:  # DDP keeps what decides the masks equal, so the masks must be equal too
        digests = [None] * engine.world_size
        dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the processes' {what} differ after search: {digests}")
    return digests


def search_result(ctx: StageContext, needed: str):
    """The search stage's result directory, which finetune needs `needed` from."""
    directory = ctx.run.result("search")
    if not (directory / needed).exists():
        raise FileNotFoundError(f"stage=finetune needs the search stage's {needed}: "
                                f"run stage=search for run '{ctx.run.name}' first")
    return directory


def dense_backbone(ctx: StageContext, files: DataFiles, stage: str) -> tuple[nn.Module, str]:
    """The trained dense backbone pruning starts from: model.weights, else `dense_run`'s or this run's dense stage."""
    cfg = ctx.cfg
    weights = cfg.model.weights
    if has_weights(weights):
        return build_backbone(cfg.model.name, files.num_classes, cfg.data.res, weights), f"model.weights={weights}"
    source = dense_source_run(cfg) or ctx.run
    directory = source.result("dense")
    if not (directory / PRODUCT_FILE).exists():
        raise FileNotFoundError(f"stage={stage} needs a trained dense network: run stage=dense (or stage=all) "
                                f"for run '{source.name}' ({source.root}) first, or give "
                                f"model.weights=<torchvision name or file>")
    model, blob = load_product(directory)
    if tuple(blob["classes"]) != tuple(files.classes) or blob["res"] != cfg.data.res:
        raise ValueError(f"the dense network in {directory} was trained on other classes or resolution "
                         f"({len(blob['classes'])} classes, {blob['res']}px)")
    return model.backbone, str(directory / PRODUCT_FILE)


def dense_source_run(cfg: DictConfig) -> RunDir | None:
    """The other run named by `dense_run` (a directory, or a run name under runs_dir), if any."""
    if not cfg.dense_run:
        return None
    path = Path(cfg.dense_run).expanduser()
    if not path.is_absolute() and "/" not in cfg.dense_run:
        path = Path(cfg.runs_dir).expanduser() / cfg.dense_run
    return RunDir(path.parent, path.name)


def accuracy_with_and_without_prompt(engine, model, loader, with_prompt: dict | None = None,
                                     loss_fn=None) -> tuple[dict, dict]:
    """(with prompt, without prompt) metrics of an ImageClassifier (METHODS.md 1 reports both).

    `with_prompt` reuses an evaluation already made; a model without a prompt gets the same dict twice.
    """
    if with_prompt is None:
        with_prompt = evaluate(engine, model, loader, loss_fn)
    if isinstance(model.input_transform, nn.Identity):
        return with_prompt, with_prompt
    with model.without_input_transform():
        return with_prompt, evaluate(engine, model, loader, loss_fn)


def make_prompt(cfg: DictConfig) -> PadPrompt:
    return PadPrompt(cfg.data.res, cfg.prompt.pad, cfg.prompt.variant)

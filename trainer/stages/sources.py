"""What the pruning stages share: which methods they serve, the dense network, a fresh prompt."""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from pruning.prompt import PadPrompt

from ..config.schema import STRUCTURED_METHODS
from ..data import DataFiles
from ..models import build_backbone, has_weights
from .context import StageContext, StageNotImplemented
from .product import PRODUCT_FILE, load_product


def require_structured(method: str, stage: str) -> None:
    """The search/finetune stages here serve the structured methods only."""
    if method == "dense":
        raise StageNotImplemented(f"method=dense has no {stage} stage")
    if method not in STRUCTURED_METHODS:
        raise StageNotImplemented(f"stage={stage} for method={method} is not implemented yet")


def dense_backbone(ctx: StageContext, files: DataFiles, stage: str) -> tuple[nn.Module, str]:
    """The trained dense backbone pruning starts from: model.weights, else this run's dense stage."""
    cfg = ctx.cfg
    weights = cfg.model.weights
    if has_weights(weights):
        return build_backbone(cfg.model.name, files.num_classes, cfg.data.res, weights), f"model.weights={weights}"
    directory = ctx.run.result("dense")
    if not (directory / PRODUCT_FILE).exists():
        raise FileNotFoundError(f"stage={stage} needs a trained dense network: run stage=dense (or stage=all) "
                                f"for run '{ctx.run.name}' first, or give model.weights=<torchvision name or file>")
    model, blob = load_product(directory)
    if tuple(blob["classes"]) != tuple(files.classes) or blob["res"] != cfg.data.res:
        raise ValueError(f"the dense network in {directory} was trained on other classes or resolution "
                         f"({len(blob['classes'])} classes, {blob['res']}px)")
    return model.backbone, str(directory / PRODUCT_FILE)


def make_prompt(cfg: DictConfig) -> PadPrompt:
    return PadPrompt(cfg.data.res, cfg.prompt.pad, cfg.prompt.variant)


def finetune_uses_prompt(cfg: DictConfig) -> bool:
    """finetune.prompt, except for the PASS no-prompt ablation, which has no prompt anywhere."""
    if cfg.method.name == "pass" and not cfg["pass"].use_prompt:
        return False
    return bool(cfg.finetune.prompt)

"""Finetune stage of the unstructured methods: train the masked network with its mask fixed.

Starts from the search stage's masked network (`model.pt`) and `masks.pt`.
All weights, norms, the classifier and (unless `finetune.prompt=false`) the
prompt train; masked weights are zero and their gradients are masked, so they
stay exactly zero (checked before anything is written). With a prompt and
`vpns.dual_step`, every batch takes a prompted and an unprompted step, as in
the search. The same finetune serves vpns and the baselines.

Besides the usual product, the result holds `torchvision_state_dict.pt`: the
backbone's state dict exactly as `torchvision.models.<arch>(num_classes=N)`
names it, zeros where masked, loadable without this project.
"""
from __future__ import annotations

import torch

from pruning.methods import get_method
from pruning.scores import FixedMasks, resolve_weight

from ..checkpoint import cpu_copy
from ..loop import fit
from ..models import ImageClassifier, count_parameters
from ..run_dir import write_json
from .context import StageContext
from .product import load_product, save_product
from .sources import accuracy_with_and_without_prompt, make_prompt, search_result
from .sparse_search import MASKS_FILE, sparsity_summary

EXPORT_FILE = "torchvision_state_dict.pt"


def export_constructor(arch: str, num_classes: int, res: int) -> str:
    """The plain torchvision call whose state dict the export is (ViTs are built for their resolution)."""
    if arch == "vit_tiny":  # the project's small ViT preset: torchvision's VisionTransformer class
        return (f"torchvision.models.vision_transformer.VisionTransformer(image_size={res}, patch_size={res // 8}, "
                f"num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes={num_classes})")
    extra = f", image_size={res}" if arch.startswith("vit") else ""
    return f"torchvision.models.{arch}(num_classes={num_classes}{extra})"


def masked_nonzeros(backbone: torch.nn.Module, masks: dict) -> int:
    """How many masked-out weight entries are not exactly zero (must be 0)."""
    total = 0
    for key, mask in masks.items():
        module, name = resolve_weight(backbone, key)
        weight = module._parameters[name].detach()
        total += int((weight[~mask.to(weight.device)] != 0).sum())
    return total


def run_sparse_finetune(ctx: StageContext) -> dict:
    cfg, engine = ctx.cfg, ctx.engine
    method = get_method(cfg.method.name)
    search_dir = search_result(ctx, MASKS_FILE)
    files = ctx.data()
    searched, blob = load_product(search_dir)
    found = (blob["arch"], blob["res"], tuple(blob["classes"]))
    if found != (cfg.model.name, cfg.data.res, tuple(files.classes)):
        raise ValueError(f"{search_dir} was searched for {found[0]} at {found[1]}px with {len(found[2])} classes, "
                         f"not {cfg.model.name} at {cfg.data.res}px with {files.num_classes}")
    masks = torch.load(search_dir / MASKS_FILE, map_location="cpu", weights_only=True)
    search = ctx.run.summary("search")

    prompt = None
    if method.finetune_prompt(cfg):  # the searched prompt (when the search had one), else a fresh zero prompt
        prompt = searched.input_transform if "prompt" in blob else make_prompt(cfg)
    torch.manual_seed(cfg.seed)
    model = engine.prepare_module(ImageClassifier(searched.backbone, prompt))  # freshly loaded: all trainable
    fixed = FixedMasks(model.backbone, masks)
    views = method.finetune_views(cfg, model, prompt)  # the search's steps per batch (an ablation's too)
    ctx.say(f"finetune: {method.name} network of {cfg.model.name} at density {search['density_achieved']:.4f}, "
            f"prompt {'on' if prompt is not None else 'off'}, {len(views) if views else 1} optimizer step(s) per batch")
    val = ctx.val_loader(files)
    result = fit(engine=engine, model=model, params=list(model.parameters()), schedule=cfg.finetune,
                 train_loader=ctx.train_loader(files), val_loader=val, stage_dir=ctx.run.stage("finetune"),
                 checkpoint_cfg=cfg.checkpoint, log_cfg=cfg.log,
                 tensorboard=ctx.tensorboard, loss_fn=ctx.loss_fn(cfg.finetune),
                 resume=cfg.resume == "auto", desc="finetune",
                 views=views)
    fixed.remove()
    leaked = masked_nonzeros(model.backbone, masks)
    if leaked:
        raise RuntimeError(f"{leaked} masked weights are no longer zero after finetune")

    with_prompt, no_prompt = accuracy_with_and_without_prompt(engine, model, val, result.final)
    headline = with_prompt if cfg.prompt.headline == "prompt" else no_prompt
    summary = {
        "stage": "finetune", "method": method.name, "family": method.family, "model": cfg.model.name,
        "data": cfg.data.name,
        "top1": headline["top1"], "top5": headline["top5"], "loss": headline["loss"], "headline": cfg.prompt.headline,
        "top1_prompt": with_prompt["top1"] if prompt is not None else None, "top1_no_prompt": no_prompt["top1"],
        "top1_dense": search["top1_dense"], "top1_before_finetune": search["top1"], "prompt": prompt is not None,
        **sparsity_summary(model.backbone, masks, cfg.data.res, cfg.pruning.density),
        "params": count_parameters(model.backbone), "masked_weights_nonzero": leaked,
        "head": search["head"], "label_mapping": search["label_mapping"],
        "epochs": cfg.finetune.epochs, "dual_step": len(views or []) == 2, "images_per_second": result.images_per_second,
        "wall_seconds": result.wall_seconds, "resumed_from": result.resumed_from,
        "res": cfg.data.res, "num_classes": files.num_classes, "world_size": engine.world_size,
        "device": str(engine.device), "export": EXPORT_FILE,
        "export_loads_into": export_constructor(cfg.model.name, files.num_classes, cfg.data.res),
    }
    if engine.is_main:
        def write(d):
            save_product(d, model, arch=cfg.model.name, classes=files.classes, res=cfg.data.res)
            torch.save({k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}, d / EXPORT_FILE)
            torch.save(cpu_copy(masks), d / MASKS_FILE)
            write_json(d / "summary.json", summary)

        ctx.run.publish("finetune", write)
        dense = f"{summary['top1_dense']:.2f}%" if summary["top1_dense"] is not None else "n/a (new head)"
        ctx.say(f"finetune: dense top-1 {dense} -> {method.name} top-1 {summary['top1']:.2f}% "
                f"(without prompt {summary['top1_no_prompt']:.2f}%) at density {summary['density_achieved']:.4f} "
                f"({summary['weights_kept']:,} of {summary['weights_scored']:,} weights); export: "
                f"{ctx.run.result('finetune') / EXPORT_FILE}")
    engine.barrier()
    return summary


__all__ = ["run_sparse_finetune", "EXPORT_FILE"]

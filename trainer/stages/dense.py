"""Dense stage: train the unpruned network (the starting point of every pruning method)."""
from __future__ import annotations

import torch

from ..loop import fit
from ..models import ImageClassifier, build_backbone, count_macs, count_parameters
from ..run_dir import write_json
from .context import StageContext
from .product import save_product


def run_dense(ctx: StageContext) -> dict:
    cfg, engine = ctx.cfg, ctx.engine
    files = ctx.data()
    torch.manual_seed(cfg.seed)  # same initial weights on every process and every restart
    backbone = build_backbone(cfg.model.name, files.num_classes, cfg.data.res, cfg.model.weights)
    model = engine.prepare_module(ImageClassifier(backbone))
    ctx.say(f"dense: {cfg.model.name} on {cfg.data.name} ({files.num_train} train / {files.num_val} val images, "
            f"{files.num_classes} classes) at {cfg.data.res}px, {engine.world_size} process(es) on {engine.device}")
    stage_dir = ctx.run.stage("dense")
    result = fit(engine=engine, model=model, params=[p for p in model.parameters() if p.requires_grad],
                 schedule=cfg.dense, train_loader=ctx.train_loader(files), val_loader=ctx.val_loader(files),
                 stage_dir=stage_dir, checkpoint_cfg=cfg.checkpoint, log_cfg=cfg.log, tensorboard=ctx.tensorboard,
                 loss_fn=ctx.loss_fn(cfg.dense), resume=cfg.resume == "auto", desc="dense")
    summary = {
        "stage": "dense", "method": cfg.method.name, "model": cfg.model.name, "data": cfg.data.name,
        "top1": result.final["top1"], "top5": result.final["top5"], "epochs": cfg.dense.epochs,
        "images_per_second": result.images_per_second, "wall_seconds": result.wall_seconds,
        "params": count_parameters(model.backbone), "flops": count_macs(model.backbone, cfg.data.res),
        "flops_unit": "multiply-accumulates per image", "res": cfg.data.res, "num_classes": files.num_classes,
        "num_train": files.num_train, "num_val": files.num_val, "world_size": engine.world_size,
        "device": str(engine.device), "resumed_from": result.resumed_from,
    }
    if engine.is_main:
        ctx.run.publish("dense", lambda d: (save_product(d, model, arch=cfg.model.name, classes=files.classes,
                                                         res=cfg.data.res),
                                            write_json(d / "summary.json", summary)))
    engine.barrier()
    return summary

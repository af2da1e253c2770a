"""Eval stage: score the run's newest product on the configured validation data."""
from __future__ import annotations

import torch

from ..run_dir import write_json
from .context import StageContext
from .product import PRODUCT_FILE, load_product
from .sources import accuracy_with_and_without_prompt

PRODUCT_STAGES = ("finetune", "dense")  # newest first


def run_eval(ctx: StageContext) -> dict:
    cfg, engine = ctx.cfg, ctx.engine
    source = next((s for s in PRODUCT_STAGES if (ctx.run.result(s) / PRODUCT_FILE).exists()), None)
    if source is None:
        raise FileNotFoundError(f"run '{ctx.run.name}' has no trained network to evaluate yet "
                                f"(looked in {', '.join(str(ctx.run.result(s)) for s in PRODUCT_STAGES)})")
    model, blob = load_product(ctx.run.result(source))
    model = engine.prepare_module(model)
    if cfg.data.val_dir:
        files = ctx.eval_data(blob["classes"])
    else:
        files = ctx.data()
    if tuple(files.classes) != tuple(blob["classes"]):
        raise ValueError(f"the validation data has classes {list(files.classes)[:3]}..., "
                         f"the {source} network was trained on {blob['classes'][:3]}...")
    loader = ctx.val_loader(files)
    metrics, no_prompt = accuracy_with_and_without_prompt(engine, model, loader, loss_fn=torch.nn.CrossEntropyLoss())
    prompt = "prompt" in blob
    headline = metrics if cfg.prompt.headline == "prompt" else no_prompt
    summary = {"stage": "eval", "method": cfg.method.name, "model": blob["arch"], "product": source,
               "top1": headline["top1"], "top5": headline["top5"], "loss": headline["loss"],
               "top1_prompt": metrics["top1"] if prompt else None, "top1_no_prompt": no_prompt["top1"],
               "num_images": metrics["count"],
               "val_source": cfg.data.val_dir or f"{cfg.data.name} validation split", "res": cfg.data.res}
    if engine.is_main:
        ctx.run.publish("eval", lambda d: write_json(d / "summary.json", summary))
        write_json(ctx.run.stage("eval") / "summary.json", summary)
    both = (f" (with prompt {metrics['top1']:.2f}%, without {no_prompt['top1']:.2f}%)" if prompt else "")
    ctx.say(f"eval: {source} network, top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%{both} "
            f"on {summary['num_images']} images of {summary['val_source']}")
    return summary

"""Finetune stage of the structured methods: extract the searched subnetwork and train it.

The dense network is cut to the search stage's `structure.json` (a physically
smaller network with the kept weights) and all its weights are trained, with
a visual prompt unless `finetune.prompt=false` (PASS starts from its searched
prompt; baselines from a zero prompt). The summary reports accuracy with and
without the prompt, FLOPs and parameters of the dense and pruned networks
(torch's counter), the kept width of every group, and measured CPU latency.
"""
from __future__ import annotations

import json

import torch

from pruning.attention import convert_attention
from pruning.extract import STRUCTURE_FILE, extract
from pruning.methods import get_method

from ..latency import compare_latency
from ..loop import evaluate, fit
from ..models import ImageClassifier, count_macs, count_parameters
from ..run_dir import write_json
from .context import StageContext
from .product import save_product
from .heads import classifier_from_state, set_classifier
from .search import CLASSIFIER_FILE, SEARCH_STATE_FILE
from .sources import accuracy_with_and_without_prompt, dense_backbone, dense_source_run, make_prompt, search_result

LATENCY_BATCH = 32


def run_finetune(ctx: StageContext) -> dict:
    cfg, engine = ctx.cfg, ctx.engine
    method = get_method(cfg.method.name)
    search_dir = search_result(ctx, STRUCTURE_FILE)
    structure = json.loads((search_dir / STRUCTURE_FILE).read_text())
    search = ctx.run.summary("search")
    files = ctx.data()
    found = (structure.get("arch"), structure.get("res"), structure.get("num_classes"))
    if found != (cfg.model.name, cfg.data.res, files.num_classes):
        raise ValueError(f"{search_dir / STRUCTURE_FILE} was searched for {found[0]} at {found[1]}px with "
                         f"{found[2]} classes, not {cfg.model.name} at {cfg.data.res}px with {files.num_classes}")
    dense, source = dense_backbone(ctx, files, "finetune")
    if (search_dir / CLASSIFIER_FILE).exists():  # head=map/new: the search's classifier replaces the stored one
        set_classifier(dense, classifier_from_state(torch.load(search_dir / CLASSIFIER_FILE, weights_only=True)))
    convert_attention(dense)
    pruned = extract(dense, structure)

    prompt = make_prompt(cfg) if method.finetune_prompt(cfg) else None
    state_file = search_dir / SEARCH_STATE_FILE
    if prompt is not None and state_file.exists():
        searched = torch.load(state_file, map_location="cpu", weights_only=True)["prompt"]
        if searched is not None:
            if searched.shape != prompt.program.shape:
                raise ValueError(f"the searched prompt in {state_file} has shape {tuple(searched.shape)}, "
                                 f"this run's prompt {tuple(prompt.program.shape)}")
            prompt.program.data.copy_(searched)
    torch.manual_seed(cfg.seed)
    model = engine.prepare_module(ImageClassifier(pruned, prompt))
    ctx.say(f"finetune: {method.name} subnetwork of {cfg.model.name} ({structure['flops_ratio']:.3f} of the dense "
            f"FLOPs), prompt {'on' if prompt is not None else 'off'}")
    val = ctx.val_loader(files)
    result = fit(engine=engine, model=model, params=[p for p in model.parameters() if p.requires_grad],
                 schedule=cfg.finetune, train_loader=ctx.train_loader(files), val_loader=val,
                 stage_dir=ctx.run.stage("finetune"), checkpoint_cfg=cfg.checkpoint, log_cfg=cfg.log,
                 tensorboard=ctx.tensorboard,
                 loss_fn=ctx.loss_fn(cfg.finetune), resume=cfg.resume == "auto", desc="finetune")

    with_prompt, no_prompt = accuracy_with_and_without_prompt(engine, model, val, result.final)
    headline = with_prompt if cfg.prompt.headline == "prompt" else no_prompt
    dense_run = dense_source_run(cfg) or ctx.run
    dense_top1 = (dense_run.summary("dense")["top1"] if dense_run.is_done("dense")
                  else evaluate(engine, engine.prepare_module(ImageClassifier(dense)), val)["top1"])
    pruned_net = model.backbone
    summary = {
        "stage": "finetune", "method": method.name, "family": method.family, "model": cfg.model.name,
        "data": cfg.data.name,
        "top1": headline["top1"], "top5": headline["top5"], "loss": headline["loss"], "headline": cfg.prompt.headline,
        "top1_prompt": with_prompt["top1"] if prompt is not None else None, "top1_no_prompt": no_prompt["top1"],
        "top1_dense": dense_top1, "top1_before_finetune": search["top1"], "prompt": prompt is not None,
        "head": search.get("head"), "label_mapping": search.get("label_mapping"),
        "flops": count_macs(pruned_net, cfg.data.res), "flops_dense": count_macs(dense, cfg.data.res),
        "params": count_parameters(pruned_net), "params_dense": count_parameters(dense),
        "flops_unit": "multiply-accumulates per image",
        "flops_ratio_target": cfg.pruning.flops_ratio,
        "kept_widths": {g["name"]: [g["kept_width"], g["size"]] for g in structure["groups"]},
        "epochs": cfg.finetune.epochs, "images_per_second": result.images_per_second,
        "wall_seconds": result.wall_seconds, "resumed_from": result.resumed_from, "dense_source": source,
        "res": cfg.data.res, "num_classes": files.num_classes, "world_size": engine.world_size,
        "device": str(engine.device),
    }
    summary["flops_ratio_achieved"] = summary["flops"] / summary["flops_dense"]
    if engine.is_main:
        timing = compare_latency({"dense": dense, "pruned": pruned_net}, cfg.data.res, batch=LATENCY_BATCH)
        dense_ms, pruned_ms = timing["dense"]["median_ms"], timing["pruned"]["median_ms"]
        summary["latency"] = {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms,
                              "batch": LATENCY_BATCH, "device": "cpu", "statistic": "median of interleaved runs",
                              "repeats": timing["dense"]["repeats"], "threads": timing["dense"]["threads"]}
        ctx.run.publish("finetune", lambda d: (save_product(d, model, arch=cfg.model.name, classes=files.classes,
                                                            res=cfg.data.res, structure=structure),
                                               write_json(d / "summary.json", summary)))
        lat = summary["latency"]
        ctx.say(f"finetune: dense top-1 {dense_top1:.2f}% -> {method.name} top-1 {summary['top1']:.2f}% "
                f"(without prompt {summary['top1_no_prompt']:.2f}%); FLOPs {summary['flops_dense'] / 1e6:.1f} M -> "
                f"{summary['flops'] / 1e6:.1f} M MACs ({summary['flops_ratio_achieved']:.3f}); CPU latency "
                f"batch {LATENCY_BATCH}: {lat['dense_ms']:.1f} ms -> {lat['pruned_ms']:.1f} ms "
                f"({lat['speedup']:.2f}x)")
    engine.barrier()
    return summary


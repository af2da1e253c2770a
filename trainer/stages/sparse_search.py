"""Search stage of the unstructured methods: decide which weights the network keeps.

`vpns` trains one score per weight and the visual prompt with every weight
and norm affine parameter frozen (norm statistics still update), one
optimizer step on the prompted batch and, with `vpns.dual_step`, a second on
the same batch without the prompt. `hydra` is the same search without the
prompt and (by default) with a per-layer threshold. `omp` and
`random_unstructured` only choose a mask: the largest |W| overall, or random
weights. Every method meets `pruning.density` exactly (METHODS.md 3, 4).

The stage publishes `masks.pt` (one boolean mask per scored weight, keyed
by the weight's state-dict name), `model.pt` (the masked network: the dense
weights with zeros where masked, the norm statistics of the search, the
classifier after label mapping, and the searched prompt) and its summary.
"""
from __future__ import annotations

import contextlib

import torch

from pruning.scores import ScoreMasks, density_report, magnitude_masks, random_masks, scorable_weights, zero_masked

from ..data import prepare_data
from ..loop import evaluate, fit
from ..models import ImageClassifier, count_macs, count_parameters, weight_macs
from ..run_dir import write_json
from .context import StageContext
from .heads import backbone_with_head, classifier_parameters
from .product import save_product
from .sources import accuracy_with_and_without_prompt, make_prompt, same_on_every_rank

MASKS_FILE = "masks.pt"
TRAINED_METHODS = ("vpns", "hydra")


def prompt_views(model: ImageClassifier, dual_step: bool) -> list:
    """The optimizer steps of one batch: prompted, then (dual step) the same batch without the prompt."""
    views = [("prompt", contextlib.nullcontext)]
    if dual_step:
        views.append(("no_prompt", model.without_input_transform))
    return views


def ablation_views(dual_step: bool) -> list | None:
    """vpns.use_prompt=false: as many optimizer steps per batch as VPNs takes, each on the plain batch, so
    that the ablation differs from VPNs in the prompt only (None: fit's single plain step)."""
    return [("plain", contextlib.nullcontext), ("plain_again", contextlib.nullcontext)] if dual_step else None


def search_views(cfg, model: ImageClassifier, prompt) -> list | None:
    """The optimizer steps per batch of the search and finetune of the unstructured methods."""
    if prompt is not None:
        return prompt_views(model, cfg.vpns.dual_step)
    if cfg.method.name == "vpns" and not cfg.vpns.use_prompt:  # the no-prompt ablation
        return ablation_views(cfg.vpns.dual_step)
    return None


def sparsity_summary(backbone, masks: dict, res: int, density_target: float) -> dict:
    """Density target/achieved, per layer, and the MACs a sparse kernel could skip."""
    report = density_report(masks)
    macs = weight_macs(backbone, res, list(masks))
    dense = count_macs(backbone, res)
    skipped = sum(macs[k] * (1 - report["per_layer"][k]) for k in masks)
    return {"density_target": density_target, "density_achieved": report["density"],
            "weights_kept": report["kept"], "weights_scored": report["total"],
            "density_per_layer": report["per_layer"], "flops": dense, "flops_dense": dense,
            "flops_sparse": int(round(dense - skipped)),
            "flops_unit": "multiply-accumulates per image (flops_sparse: if masked weights were skipped)"}


def run_sparse_search(ctx: StageContext) -> dict:
    cfg, engine = ctx.cfg, ctx.engine
    method, density, v = cfg.method.name, cfg.pruning.density, cfg.vpns
    files = prepare_data(cfg.data, is_writer=engine.is_main, barrier=engine.barrier, log=ctx.say)
    torch.manual_seed(cfg.seed)  # same scores, head and prompt on every process and every restart
    prompt = make_prompt(cfg) if method == "vpns" and v.use_prompt else None
    backbone, source, head = backbone_with_head(ctx, files, prompt)
    ctx.say(f"search: {method} on {cfg.model.name} from {source}, target density {density}")
    val = ctx.val_loader(files)
    # A fresh head has not learnt anything yet: the dense network has no meaningful accuracy then.
    dense_top1 = (None if head["head"] == "new"
                  else evaluate(engine, engine.prepare_module(ImageClassifier(backbone)), val)["top1"])

    result = None
    if method in TRAINED_METHODS:
        for p in backbone.parameters():  # weights and norm affine frozen; the norms' statistics still update
            p.requires_grad_(False)
        if head["head"] == "new":
            for p in classifier_parameters(backbone):
                p.requires_grad_(True)
        scores = ScoreMasks(backbone, density, threshold=v.threshold, exclude_first=v.exclude_first,
                            exclude_classifier=v.exclude_classifier)
        model = engine.prepare_module(ImageClassifier(backbone, prompt))
        trainable = [p for p in model.parameters() if p.requires_grad]
        if prompt is not None and v.prompt_lr is not None:  # the prompt at its own rate, the rest at search.lr
            own = {id(p) for p in prompt.parameters()}
            trainable = [{"params": [p for p in trainable if id(p) not in own]},
                         {"params": list(prompt.parameters()), "lr": v.prompt_lr}]
        views = search_views(cfg, model, prompt)
        ctx.say(f"search: {len(scores.weights)} scored layers, {scores.total():,} scored weights, "
                f"{v.threshold} threshold, prompt {prompt.effective_parameters if prompt else 0:,} effective "
                f"parameters, {len(views) if views else 1} optimizer step(s) per batch"
                f"{' (no-prompt ablation)' if method == 'vpns' and not v.use_prompt else ''}")
        result = fit(engine=engine, model=model, params=trainable, schedule=cfg.search,
                     train_loader=ctx.train_loader(files), val_loader=val, stage_dir=ctx.run.stage("search"),
                     checkpoint_cfg=cfg.checkpoint, log_cfg=cfg.log,
                     tensorboard=ctx.tensorboard, loss_fn=ctx.loss_fn(cfg.search),
                     resume=cfg.resume == "auto", desc="search",
                     views=views)
        masks = scores.remove()
        threshold = v.threshold
    else:
        weights = scorable_weights(backbone, exclude_first=v.exclude_first, exclude_classifier=v.exclude_classifier)
        masks = (magnitude_masks(weights, density) if method == "omp"
                 else random_masks(weights, density, seed=cfg.seed))
        model = engine.prepare_module(ImageClassifier(backbone))
        threshold = "global" if method == "omp" else "random"

    digests = same_on_every_rank(engine, list(masks.values()), "masks")
    zero_masked(model.backbone, masks)  # the product is the masked network
    # fit's last evaluation already scored the masked network with its prompt (W * M = the zeroed weights)
    with_prompt, no_prompt = accuracy_with_and_without_prompt(engine, model, val, result.final if result else None)
    headline = with_prompt if cfg.prompt.headline == "prompt" else no_prompt
    summary = {
        "stage": "search", "method": method, "model": cfg.model.name, "data": cfg.data.name,
        "top1": headline["top1"], "top5": headline["top5"], "top1_meaning": "masked network before finetune",
        "top1_prompt": with_prompt["top1"] if prompt is not None else None, "top1_no_prompt": no_prompt["top1"],
        "top1_dense": dense_top1, **sparsity_summary(model.backbone, masks, cfg.data.res, density),
        "params": count_parameters(model.backbone), "threshold": threshold, **head,
        "epochs": cfg.search.epochs if method in TRAINED_METHODS else 0,
        "images_per_second": result.images_per_second if result else 0.0,
        "wall_seconds": result.wall_seconds if result else 0.0,
        "resumed_from": result.resumed_from if result else None,
        "dense_source": source, "world_size": engine.world_size, "mask_digest_per_rank": digests,
    }
    empty = [k for k, d in summary["density_per_layer"].items() if d == 0]
    if empty:  # the global threshold can remove whole layers (docs/vpns.md, "layer collapse")
        ctx.say(f"search: warning: {len(empty)} layer(s) keep no weight at all ({', '.join(empty[:4])}"
                f"{', ...' if len(empty) > 4 else ''}); vpns.threshold=layer keeps every layer at the density")
    ctx.say(f"search: {method} keeps {summary['weights_kept']:,} of {summary['weights_scored']:,} scored weights "
            f"(density {summary['density_achieved']:.4f}, target {density}); masked network top-1 "
            f"{summary['top1']:.2f}%" + (f" (dense {dense_top1:.2f}%)" if dense_top1 is not None else ""))

    def write(d):
        save_product(d, model, arch=cfg.model.name, classes=files.classes, res=cfg.data.res)
        torch.save(masks, d / MASKS_FILE)
        write_json(d / "summary.json", summary)

    if engine.is_main:
        ctx.run.publish("search", write)
    engine.barrier()
    return summary

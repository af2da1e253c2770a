"""Search stage of the unstructured methods: decide which weights the network keeps.

The method (pruning/methods, `cfg.method.name`) decides: a trained score
search (VPNs: one score per weight and the visual prompt, every weight and
norm affine parameter frozen, norm statistics still updating; HYDRA: the same
without the prompt) or a one-shot mask (OMP: the largest |W| overall; random
weights). Every method meets `pruning.density` exactly (METHODS.md 3, 4).

The stage publishes `masks.pt` (one boolean mask per scored weight, keyed
by the weight's state-dict name), `model.pt` (the masked network: the dense
weights with zeros where masked, the norm statistics of the search, the
classifier after label mapping, and the searched prompt) and its summary.
"""
from __future__ import annotations

import torch

from pruning.methods import get_method
from pruning.scores import density_report, zero_masked

from ..checkpoint import cpu_copy
from ..loop import evaluate
from ..models import ImageClassifier, classifier_name, count_macs, count_parameters, weight_macs
from ..run_dir import write_json
from .context import StageContext
from .heads import backbone_with_head
from .job import StageSearchJob
from .product import save_product
from .sources import accuracy_with_and_without_prompt, make_prompt, same_on_every_rank

MASKS_FILE = "masks.pt"


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
    method, density = get_method(cfg.method.name), cfg.pruning.density
    files = ctx.data()
    torch.manual_seed(cfg.seed)  # same scores, head and prompt on every process and every restart
    prompt = make_prompt(cfg) if method.search_prompt(cfg) else None
    backbone, source, head = backbone_with_head(ctx, files, prompt)
    ctx.say(f"search: {method.name} on {cfg.model.name} from {source}, target density {density}")
    val = ctx.val_loader(files)
    # A fresh head has not learnt anything yet: the dense network has no meaningful accuracy then.
    dense_top1 = (None if head["head"] == "new"
                  else evaluate(engine, engine.prepare_module(ImageClassifier(backbone)), val)["top1"])
    decision = method.search(StageSearchJob(ctx, files, backbone, prompt, head_name=classifier_name(backbone),
                                            train_head=head["head"] == "new"))
    masks, model, result, threshold = decision.masks, decision.model, decision.fit, decision.threshold

    digests = same_on_every_rank(engine, list(masks.values()), "masks")
    zero_masked(model.backbone, masks)  # the product is the masked network
    # fit's last evaluation already scored the masked network with its prompt (W * M = the zeroed weights)
    with_prompt, no_prompt = accuracy_with_and_without_prompt(engine, model, val, result.final if result else None)
    headline = with_prompt if cfg.prompt.headline == "prompt" else no_prompt
    summary = {
        "stage": "search", "method": method.name, "family": method.family, "model": cfg.model.name,
        "data": cfg.data.name,
        "top1": headline["top1"], "top5": headline["top5"], "top1_meaning": "masked network before finetune",
        "top1_prompt": with_prompt["top1"] if prompt is not None else None, "top1_no_prompt": no_prompt["top1"],
        "top1_dense": dense_top1, **sparsity_summary(model.backbone, masks, cfg.data.res, density),
        "params": count_parameters(model.backbone), "threshold": threshold, **head,
        "epochs": cfg.search.epochs if method.trains else 0,
        "images_per_second": result.images_per_second if result else 0.0,
        "wall_seconds": result.wall_seconds if result else 0.0,
        "resumed_from": result.resumed_from if result else None,
        "dense_source": source, "world_size": engine.world_size, "mask_digest_per_rank": digests,
        **decision.extra,
    }
    empty = [k for k, d in summary["density_per_layer"].items() if d == 0]
    if empty:  # the global threshold can remove whole layers (docs/vpns.md, "layer collapse")
        ctx.say(f"search: warning: {len(empty)} layer(s) keep no weight at all ({', '.join(empty[:4])}"
                f"{', ...' if len(empty) > 4 else ''}); {method.empty_layer_hint}")
    ctx.say(f"search: {method.name} keeps {summary['weights_kept']:,} of {summary['weights_scored']:,} scored weights "
            f"(density {summary['density_achieved']:.4f}, target {density}); masked network top-1 "
            f"{summary['top1']:.2f}%" + (f" (dense {dense_top1:.2f}%)" if dense_top1 is not None else ""))

    def write(d):
        save_product(d, model, arch=cfg.model.name, classes=files.classes, res=cfg.data.res)
        torch.save(cpu_copy(masks), d / MASKS_FILE)
        write_json(d / "summary.json", summary)

    if engine.is_main:
        ctx.run.publish("search", write)
    engine.barrier()
    return summary

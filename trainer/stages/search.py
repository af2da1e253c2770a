"""Search stage of the structured methods: decide which channels every group keeps.

PASS trains the hypernetwork, its prompt encoder and the prompt with the
backbone frozen (resumable like any stage), then runs the hypernetwork once
and picks channels by bisection on a global logit offset so the network meets
the FLOPs budget. The baselines (l1, random, uniform) only rank channels and
meet the same budget. Either way the stage publishes `structure.json` (the
decision, shared with finetune), its summary, and for PASS `search.pt` (the
hypernetwork and the prompt, which finetune starts from). When the dense
classifier does not fit the data (`head=map` or `new`, e.g. weights trained on
another data set), the search starts from the mapped or fresh classifier, PASS
trains a fresh one with its hypernetwork, and the stage publishes it as
`classifier.pt` for finetune.
"""
from __future__ import annotations

import torch

from pruning.baselines import select_baseline
from pruning.extract import STRUCTURE_FILE, choose_channels, extract, make_structure
from pruning.flops_model import FlopsModel
from pruning.graph import build_graph
from pruning.pass_network import PassSearchNetwork
from pruning.stats import group_statistics

from ..data import prepare_data
from ..loop import fit
from ..models import ImageClassifier, classifier_name, count_macs, count_parameters
from ..run_dir import write_json
from .context import StageContext
from .heads import backbone_with_head, classifier_parameters
from .sources import accuracy_with_and_without_prompt, make_prompt, same_on_every_rank

SEARCH_STATE_FILE = "search.pt"
CLASSIFIER_FILE = "classifier.pt"


def run_search(ctx: StageContext) -> dict:
    cfg, engine = ctx.cfg, ctx.engine
    method = cfg.method.name
    files = prepare_data(cfg.data, is_writer=engine.is_main, barrier=engine.barrier, log=ctx.say)
    torch.manual_seed(cfg.seed)  # same hypernetwork initialisation on every process and restart
    # Label mapping runs without a prompt: the search's prompt starts at zero, which changes no image.
    backbone, source, head = backbone_with_head(ctx, files, None)
    ctx.say(f"search: {method} on {cfg.model.name} from {source}, target FLOPs ratio {cfg.pruning.flops_ratio}")
    if method == "pass":
        net, kept, fit_result, extra = _search_pass(ctx, files, backbone, train_head=head["head"] == "new")
        graph, flops, prompt = net.graph, net.flops, net.prompt
    else:
        graph = build_graph(backbone, cfg.data.res, residual=cfg.pruning.residual)
        flops = FlopsModel(backbone, graph, cfg.data.res)
        kept = select_baseline(method, group_statistics(backbone, graph), flops, cfg.pruning.flops_ratio,
                               min_keep=cfg.pruning.min_keep, round_to=cfg.pruning.round_to, seed=cfg.seed)
        net, fit_result, extra, prompt = None, None, {}, None

    structure = make_structure(graph, kept, arch=cfg.model.name, res=cfg.data.res,
                               num_classes=files.num_classes, flops=flops)
    shortfall = cfg.pruning.flops_ratio - structure["flops_ratio"]
    if shortfall > 0.01:  # METHODS.md 2.5: within 1% of the dense FLOPs
        ctx.say(f"search: warning: the kept network costs {structure['flops_ratio']:.3f} of the dense FLOPs, "
                f"{shortfall:.3f} below the target: the groups are too coarse (heads, round_to) to get closer")
    # The extracted network before finetuning, as a check of the decision (with the searched prompt).
    pruned = extract(backbone.cpu(), structure)
    with_prompt, no_prompt = accuracy_with_and_without_prompt(
        engine, engine.prepare_module(ImageClassifier(pruned, prompt)), ctx.val_loader(files))
    before = with_prompt if cfg.prompt.headline == "prompt" else no_prompt
    summary = {
        "stage": "search", "method": method, "model": cfg.model.name, "data": cfg.data.name,
        "top1": before["top1"], "top5": before["top5"], "top1_meaning": "extracted network before finetune",
        "top1_prompt": with_prompt["top1"] if prompt is not None else None, "top1_no_prompt": no_prompt["top1"],
        "flops_ratio_target": cfg.pruning.flops_ratio, "flops_ratio_achieved": structure["flops_ratio"],
        "flops_ratio_shortfall": shortfall,
        "flops": count_macs(pruned, cfg.data.res), "flops_dense": structure["flops_dense"],
        "params": count_parameters(pruned), "params_dense": count_parameters(backbone),
        "kept_widths": {g["name"]: [g["kept_width"], g["size"]] for g in structure["groups"]},
        "epochs": cfg.search.epochs if method == "pass" else 0,
        "images_per_second": fit_result.images_per_second if fit_result else 0.0,
        "wall_seconds": fit_result.wall_seconds if fit_result else 0.0,
        "resumed_from": fit_result.resumed_from if fit_result else None,
        "dense_source": source, "world_size": engine.world_size, **head, **extra,
    }

    def write(d):
        write_json(d / STRUCTURE_FILE, structure)
        write_json(d / "summary.json", summary)
        if head["head"] in ("map", "new"):  # finetune starts from this classifier, not the stored one
            classifier = backbone.get_submodule(classifier_name(backbone))
            torch.save({k: v.detach().cpu() for k, v in classifier.state_dict().items()}, d / CLASSIFIER_FILE)
        if net is not None:
            torch.save({"hypernet": net.hypernet.state_dict(),
                        "prompt": net.prompt.program.detach().cpu() if net.prompt is not None else None},
                       d / SEARCH_STATE_FILE)

    if engine.is_main:
        ctx.run.publish("search", write)
    engine.barrier()
    return summary


def _search_pass(ctx: StageContext, files, backbone, train_head: bool):
    cfg, engine = ctx.cfg, ctx.engine
    h = cfg["pass"]
    if cfg.engine.sync_bn and engine.world_size > 1:
        # SyncBatchNorm replaces the BatchNorm modules the masks are hooked on (and the frozen
        # backbone's BatchNorm runs in eval mode anyway).
        raise ValueError("engine.sync_bn=true is not supported in PASS search; drop it for this stage")
    prompt = make_prompt(cfg) if h.use_prompt else None
    net = PassSearchNetwork(backbone, res=cfg.data.res, prompt=prompt, pass_cfg=h,
                            flops_ratio=cfg.pruning.flops_ratio, residual=cfg.pruning.residual)
    head_params = classifier_parameters(backbone) if train_head else []
    for p in head_params:  # a fresh classifier (head=new) cannot stay frozen: it trains with the hypernetwork
        p.requires_grad_(True)
    net = engine.prepare_module(net)
    hyper, prompt_params = net.trainable_parameters()
    params = [{"params": hyper}]
    if prompt_params:
        params.append({"params": prompt_params, "lr": h.prompt_lr})
    if head_params:
        params.append({"params": head_params})
    ctx.say(f"search: {len(net.graph.groups)} channel groups, hypernetwork {sum(p.numel() for p in hyper):,} "
            f"parameters, prompt {prompt.effective_parameters if prompt else 0:,} effective parameters")
    start = net.hard_masks()
    result = fit(engine=engine, model=net, params=params, schedule=cfg.search, train_loader=ctx.train_loader(files),
                 val_loader=ctx.val_loader(files), stage_dir=ctx.run.stage("search"), checkpoint_cfg=cfg.checkpoint,
                 log_cfg=cfg.log, tensorboard=ctx.tensorboard, loss_fn=ctx.loss_fn(cfg.search),
                 resume=cfg.resume == "auto", desc="search")
    net.eval()
    with torch.no_grad():
        logits = [l.cpu() for l in net.logits()]
    net.masks.remove()  # the backbone is extracted from next: no hooks may travel with it
    end = [(l > 0).float() for l in logits]
    kept = choose_channels(logits, net.flops, cfg.pruning.flops_ratio, min_keep=cfg.pruning.min_keep,
                           round_to=cfg.pruning.round_to)
    extra = {
        "mask_digest_per_rank": same_on_every_rank(engine, end, "hypernetwork masks"),
        "mask_flops_ratio_start": float(net.flops.ratio([m.sum() for m in start])),
        "mask_flops_ratio_end": float(net.flops.ratio([m.sum() for m in end])),
        "mask_channels_changed": int(sum((a.cpu() != b).sum() for a, b in zip(start, end))),
        "offset_bisection": "global logit offset, FLOPs <= target",
    }
    ctx.say(f"search: hypernetwork masks keep {extra['mask_flops_ratio_end']:.3f} of the dense FLOPs "
            f"({extra['mask_channels_changed']} channels changed since the start); extraction keeps "
            f"{net.flops.ratio([len(k) for k in kept]):.3f} (target {cfg.pruning.flops_ratio})")
    return net, kept, result, extra

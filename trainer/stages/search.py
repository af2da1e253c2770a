"""Search stage of the structured methods: decide which channels every group keeps.

The method (pruning/methods, `cfg.method.name`) decides: a trained search
(PASS: hypernetwork and prompt, the backbone frozen; resumable like any
stage) or a one-shot ranking, either way meeting the FLOPs budget. The stage
publishes `structure.json` (the decision, shared with finetune), its summary,
and the method's search state as `search.pt` when it has one (PASS: the
hypernetwork and the prompt, which finetune starts from). When the dense
classifier does not fit the data (`head=map` or `new`, e.g. weights trained on
another data set), the search starts from the mapped or fresh classifier (a
fresh one trains with a trained search) and the stage publishes it as
`classifier.pt` for finetune.
"""
from __future__ import annotations

import torch

from pruning.extract import STRUCTURE_FILE, extract, make_structure
from pruning.methods import get_method

from ..checkpoint import cpu_copy
from ..models import ImageClassifier, classifier_name, count_macs, count_parameters
from ..run_dir import write_json
from .context import StageContext
from .heads import backbone_with_head
from .job import StageSearchJob
from .sources import accuracy_with_and_without_prompt, make_prompt, same_on_every_rank

SEARCH_STATE_FILE = "search.pt"
CLASSIFIER_FILE = "classifier.pt"


def run_search(ctx: StageContext) -> dict:
    cfg, engine = ctx.cfg, ctx.engine
    method = get_method(cfg.method.name)
    files = ctx.data()
    torch.manual_seed(cfg.seed)  # same initialisation on every process and restart
    # Label mapping runs without a prompt: the search's prompt starts at zero, which changes no image.
    backbone, source, head = backbone_with_head(ctx, files, None)
    ctx.say(f"search: {method.name} on {cfg.model.name} from {source}, target FLOPs ratio {cfg.pruning.flops_ratio}")
    job = StageSearchJob(ctx, files, backbone, make_prompt(cfg) if method.search_prompt(cfg) else None,
                         head_name=classifier_name(backbone), train_head=head["head"] == "new")
    decision = method.search(job)
    graph, flops, prompt, fit_result = decision.graph, decision.flops, decision.prompt, decision.fit

    structure = make_structure(graph, decision.kept, arch=cfg.model.name, res=cfg.data.res,
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
        "stage": "search", "method": method.name, "family": method.family, "model": cfg.model.name,
        "data": cfg.data.name,
        "top1": before["top1"], "top5": before["top5"], "top1_meaning": "extracted network before finetune",
        "top1_prompt": with_prompt["top1"] if prompt is not None else None, "top1_no_prompt": no_prompt["top1"],
        "flops_ratio_target": cfg.pruning.flops_ratio, "flops_ratio_achieved": structure["flops_ratio"],
        "flops_ratio_shortfall": shortfall,
        "flops": count_macs(pruned, cfg.data.res), "flops_dense": structure["flops_dense"],
        "params": count_parameters(pruned), "params_dense": count_parameters(backbone),
        "kept_widths": {g["name"]: [g["kept_width"], g["size"]] for g in structure["groups"]},
        "epochs": cfg.search.epochs if method.trains else 0,
        "images_per_second": fit_result.images_per_second if fit_result else 0.0,
        "wall_seconds": fit_result.wall_seconds if fit_result else 0.0,
        "resumed_from": fit_result.resumed_from if fit_result else None,
        "dense_source": source, "world_size": engine.world_size, **head,
        "kept_digest_per_rank": same_on_every_rank(engine, [torch.as_tensor(k) for k in decision.kept], "kept channels"),
        **decision.extra,
    }

    def write(d):
        write_json(d / STRUCTURE_FILE, structure)
        write_json(d / "summary.json", summary)
        if head["head"] in ("map", "new"):  # finetune starts from this classifier, not the stored one
            classifier = backbone.get_submodule(classifier_name(backbone))
            torch.save({k: v.detach().cpu() for k, v in classifier.state_dict().items()}, d / CLASSIFIER_FILE)
        if decision.state is not None:
            torch.save(cpu_copy(decision.state), d / SEARCH_STATE_FILE)

    if engine.is_main:
        ctx.run.publish("search", write)
    engine.barrier()
    return summary

#!/usr/bin/env python
"""CPU time of one PASS and one VPNs search step next to a plain training step of the same backbone.

    python benchmarks/search_overhead.py [--models resnet18 resnet50] [--batch 32] [--res 128] \
        [--repeats 7] [--warmup 1] [--out search_overhead.json]

For every backbone, three training steps are built with the project's own
modules, the way the stages build them, and timed in turns (one step of each
per round, the order rotated every round, so load from other processes hits
all alike); the median over rounds is reported:

  plain   the dense stage's step: ImageClassifier(backbone), every weight
          trainable, the dense schedule's optimizer (SGD momentum 0.9);
  pass    the PASS search step (trainer/stages/search.py): PassSearchNetwork
          (frozen backbone, BatchNorm in eval mode, hypernetwork over the
          channel groups, straight-through channel masks, pad prompt, FLOPs
          model and budget loss), AdamW on hypernetwork + prompt (prompt lr
          pass.prompt_lr);
  vpns    the VPNs search step (pruning/methods/unstructured.py, ScoreSearch): ScoreMasks
          on every Conv2d/Linear (global threshold, recomputed after every
          optimizer step), weights and norm affine frozen, pad prompt, Adam on
          scores + prompt; with vpns.dual_step=true (the default) one
          optimizer step on the prompted batch, then a second on the same batch
          without the prompt. The two halves are timed separately too: the
          prompted half alone is what a single-step search
          (vpns.dual_step=false) costs; "per optimizer step" is the
          dual step's time over its two optimizer steps.

Each step is the training loop's inner body (trainer/loop.py fit):
forward under the engine's autocast, cross-entropy (+ the PASS budget term),
engine.backward, engine.step (clipping if configured, optimizer, schedule,
zero_grad), through a one-process DDPEngine with the project's CPU defaults
(fp32, contiguous memory). Inputs are synthetic uint8 images and labels made
once: no data loading is timed. Backbones start from random weights (the
masks' values do not change the work: masks multiply, nothing is skipped).

Two components are timed in the same rounds to explain the totals:
the PASS hypernetwork + FLOPs model + budget loss alone (forward and
backward, no backbone), and one recomputation of VPNs' global top-k mask
over all scores (done after every optimizer step, so twice per dual step).

Prints a table, the verdict on issue 19's CPU targets (PASS search step at
most 0.8x plain, VPNs optimizer step at most 1.3x plain), and writes JSON
(--out) with the machine, date and versions.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (TrainStep, argument_parser, load_average, machine_info, parse_args,  # noqa: E402
                               pass_search_step, stage_config, vpns_search_step, write_report)
from pruning.hypernet import budget_loss, straight_through_mask  # noqa: E402
from trainer.distributed import DistEnv  # noqa: E402
from trainer.engines import DDPEngine  # noqa: E402
from trainer.models import ImageClassifier, build_backbone, count_macs  # noqa: E402


# --------------------------------------------------------------------------- building the steps


def build_plain(model_name: str, classes: int, res: int, batch: int, runs_dir: str) -> TrainStep:
    """The dense stage (trainer/stages/dense.py)."""
    cfg = stage_config(model_name, "dense", device="cpu", res=res, batch=batch, runs_dir=runs_dir)
    engine = DDPEngine(cfg.engine, DistEnv())
    torch.manual_seed(cfg.seed)
    model = engine.prepare_module(ImageClassifier(build_backbone(model_name, classes, res)))
    return TrainStep(cfg, engine, model, [p for p in model.parameters() if p.requires_grad], cfg.dense)


def build_pass(model_name: str, classes: int, res: int, batch: int, runs_dir: str) -> TrainStep:
    """The PASS search step (pruning/methods/pass_.py, Pass.search)."""
    cfg = stage_config(model_name, "pass", device="cpu", res=res, batch=batch, runs_dir=runs_dir)
    engine = DDPEngine(cfg.engine, DistEnv())
    torch.manual_seed(cfg.seed)
    return pass_search_step(cfg, engine, build_backbone(model_name, classes, res))


def build_vpns(model_name: str, classes: int, res: int, batch: int, runs_dir: str) -> TrainStep:
    """The VPNs search step (pruning/methods/unstructured.py, ScoreSearch) with the backbone's own head (head=keep)."""
    cfg = stage_config(model_name, "vpns", device="cpu", res=res, batch=batch, runs_dir=runs_dir)
    engine = DDPEngine(cfg.engine, DistEnv())
    torch.manual_seed(cfg.seed)
    return vpns_search_step(cfg, engine, build_backbone(model_name, classes, res))


# --------------------------------------------------------------------------- components


def pass_hypernet_part(step: TrainStep) -> float:
    """Seconds of the hypernetwork + FLOPs model + budget loss, forward and backward, without the backbone."""
    net = step.model
    start = time.perf_counter()
    masks = [straight_through_mask(l) for l in net.logits()]
    loss = budget_loss(net.flops.ratio([m.sum() for m in masks]), net.target, net.loss_kind, net.loss_weight)
    loss.backward()
    seconds = time.perf_counter() - start
    step.engine.optimizer.zero_grad(set_to_none=True)
    return seconds


def vpns_mask_part(step: TrainStep) -> float:
    """Seconds of one recomputation of the global top-k mask over all scores (after every optimizer step),
    as the forward does it (float masks, no host sync)."""
    step.scores.invalidate()
    start = time.perf_counter()
    step.scores.float_masks()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- measuring


def measure(model_name: str, args, runs_dir: str) -> dict:
    builders = {"plain": build_plain, "pass": build_pass, "vpns": build_vpns}
    steps = {name: build(model_name, args.classes, args.res, args.batch, runs_dir) for name, build in builders.items()}
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    dual = len(steps["vpns"].views) > 1
    times = {"plain": [], "pass": [], "vpns": [], "vpns_substep": [], "vpns_prompted": [], "vpns_unprompted": [],
             "pass_hypernet": [], "vpns_mask": []}
    order = list(steps)
    for r in range(args.warmup + args.repeats):
        rotated = order[r % len(order):] + order[:r % len(order)]
        row = {}
        for name in rotated:
            seconds = steps[name](images, labels)
            row[name] = sum(seconds)
            if name == "vpns":
                row["vpns_substep"] = sum(seconds) / len(seconds)
                row["vpns_prompted"] = seconds[0]
                if dual:
                    row["vpns_unprompted"] = seconds[1]
        row["pass_hypernet"] = pass_hypernet_part(steps["pass"])
        row["vpns_mask"] = vpns_mask_part(steps["vpns"])
        if r >= args.warmup:
            for k, v in row.items():
                times[k].append(v)
        print(f"  {model_name} round {r + 1}/{args.warmup + args.repeats}"
              f"{' (warm-up)' if r < args.warmup else ''}: "
              + "  ".join(f"{k} {1000 * row[k]:.0f} ms" for k in order), flush=True)
    steps["vpns"].scores.remove()  # its optimizer hook is global: detach it before the next backbone
    med = {k: 1000 * statistics.median(v) for k, v in times.items() if v}
    plain = med["plain"]
    cfgs = {name: s.cfg for name, s in steps.items()}
    return {
        "model": model_name, "macs_per_image": count_macs(build_backbone(model_name, args.classes, args.res), args.res),
        "dual_step": dual, "pass_groups": steps["pass"].groups,
        "trainable_parameters": {name: s.trainable for name, s in steps.items()},
        "optimizers": {"plain": cfgs["plain"].dense.optimizer, "pass": cfgs["pass"].search.optimizer,
                       "vpns": cfgs["vpns"].search.optimizer},
        "median_ms": med, "ratio_to_plain": {k: v / plain for k, v in med.items()},
        "raw_ms": {k: [1000 * x for x in v] for k, v in times.items()},
    }


# --------------------------------------------------------------------------- report


def print_table(results: list[dict], args) -> list[str]:
    lines = [f"CPU, {torch.get_num_threads()} threads, batch {args.batch}, {args.res}px, {args.classes} classes, fp32; "
             f"median of {args.repeats} rounds (after {args.warmup} warm-up), steps timed in turns",
             f"{'model':<10}{'step':<46}{'trainable':>11}{'ms/step':>10}{'img/s':>8}{'x plain':>9}"]
    for res in results:
        m, med, ratio, tp = res["model"], res["median_ms"], res["ratio_to_plain"], res["trainable_parameters"]
        opt = res["optimizers"]
        rows = [
            ("plain", f"plain training step ({opt['plain']}, all weights)", tp["plain"]),
            ("pass", f"PASS search step ({opt['pass']}, hypernet + prompt)", tp["pass"]),
            ("vpns", f"VPNs search step, {'dual step (default)' if res['dual_step'] else 'single step'} "
                     f"({opt['vpns']})", tp["vpns"]),
            ("vpns_substep", "  per optimizer step (sub-step)", None),
            ("vpns_prompted", "  prompted half = single step (dual_step=false)", None),
            ("vpns_unprompted", "  unprompted half", None),
            ("pass_hypernet", "  [part] PASS hypernet+FLOPs+budget, fwd+bwd", None),
            ("vpns_mask", "  [part] VPNs global top-k mask, once", None),
        ]
        for i, (key, label, trainable) in enumerate(rows):
            if key not in med:
                continue
            ips = f"{1000 * args.batch / med[key]:>8.1f}" if not key.endswith(("_hypernet", "_mask")) else f"{'':>8}"
            lines.append(f"{m if i == 0 else '':<10}{label:<46}"
                         f"{(f'{trainable / 1e6:.2f}M' if trainable is not None else ''):>11}"
                         f"{med[key]:>10.1f}{ips}{ratio[key]:>8.2f}x")
    for res in results:  # issue 19's targets on the CPU
        ratio = res["ratio_to_plain"]
        for key, label, target in (("pass", "PASS search step", 0.8), ("vpns_substep", "VPNs sub-step", 1.3)):
            if key in ratio:
                lines.append(f"{res['model']}: {label} {ratio[key]:.2f}x plain (target <= {target}x): "
                             f"{'met' if ratio[key] <= target else 'NOT met'}")
    print("\n".join(lines))
    return lines


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--res", type=int, default=128,
                        help="input resolution (default 128: the whole default run took 3 minutes on a shared "
                             "2-core CPU)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    args = parse_args(parser, "search_overhead")
    info = machine_info()
    started = time.time()
    print(f"{info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch']}, {info['date']}, "
          f"load average {info['load_average_start']}")
    results = []
    with tempfile.TemporaryDirectory() as runs_dir:  # load_config looks for a stored run there: none
        for model_name in args.models:
            results.append(measure(model_name, args, runs_dir))
    table = print_table(results, args)
    info.update(load_average_end=load_average(), wall_seconds=time.time() - started)
    print(f"load average at the end {info['load_average_end']}, {info['wall_seconds']:.0f} s in all")
    report = {"benchmark": "search_overhead", **info, "device": "cpu", "batch": args.batch, "res": args.res,
              "classes": args.classes, "repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
              "precision": "fp32", "table": table, "results": results}
    write_report(args.out, report)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Images/second per GPU of the dense, PASS search, VPNs search and finetune training steps, and the fraction of peak.

    python benchmarks/gpu_throughput.py [--model resnet50] [--res 176] [--batch 256] [--steps 20] \
        [--repeats 5] [--peak-tflops N] [--out gpu_throughput.json]
    python benchmarks/gpu_throughput.py --device cpu --steps 2      # smoke test of the code path, not a GPU figure

One process, one GPU (no DDP all-reduce: a multi-GPU run adds its gradient
communication on top), bf16 autocast and channels_last (the engine's
settings on a GPU), synthetic uint8 images made once on the GPU (no data
loading is timed). Four training steps, each built the way its stage builds
it and run through the loop's inner body (trainer/loop.py fit: forward under
autocast, cross-entropy + extra loss, engine.backward, engine.step):

  dense     trainer/stages/dense.py: all weights of the dense network, SGD;
  pass      trainer/stages/search.py: PassSearchNetwork (frozen backbone,
            hypernetwork, channel masks, prompt, FLOPs model, budget loss),
            AdamW on hypernetwork + prompt;
  vpns      pruning/methods/unstructured.py (ScoreSearch): frozen weights,
            score masks (global top-k after every optimizer step), prompt;
            with vpns.dual_step (the default) two optimizer steps per batch,
            prompted then unprompted, so its images/s counts batches, each
            of two sub-steps;
  finetune  trainer/stages/finetune.py: the physically smaller network
            extracted (pruning/extract.py) at --flops-ratio with a structured
            baseline's choice of channels (pruning/baselines.py, default
            `uniform`: the same keep fraction in every group), or the
            structure.json of a real search (--structure PATH), all weights +
            prompt trained, SGD.

The kinds are timed in turns: every round runs --steps steps of each (the
order rotated every round), synchronised, so that clock and load changes hit
all alike; images/s is the median over --repeats rounds after --warmup
untimed steps of each.

FLOPs per image are torch's count (FlopCounterMode, trainer.models.flop_counter)
of one whole training step (forward + backward, matmuls and convolutions),
divided by the batch: what the step really executes. For dense and finetune
that is about 3 x forward (6 x forward MACs); for PASS about 2 x forward, as the
frozen backbone's weight gradients are never computed. The usual convention,
6 x forward MACs (count_macs), is reported next to it. Achieved TFLOP/s =
images/s x counted FLOPs per image; the fraction of peak divides it by the
GPU's dense bf16 tensor peak (table below, or --peak-tflops).

Without a CUDA device it says so in one line, writes JSON with "gpu": null and
exits 0. `--device cpu` runs the same code on the CPU (small batch) so that
the path is exercised: those figures are labelled as CPU and get no peak
fraction.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (TrainStep, argument_parser, machine_info, parse_args, pass_search_step,  # noqa: E402
                               stage_config, sync, vpns_search_step, write_report)
from pruning.attention import convert_attention  # noqa: E402
from pruning.baselines import select_baseline  # noqa: E402
from pruning.extract import extract, make_structure  # noqa: E402
from pruning.flops_model import FlopsModel  # noqa: E402
from pruning.graph import build_graph  # noqa: E402
from pruning.stats import group_statistics  # noqa: E402
from trainer.distributed import DistEnv  # noqa: E402
from trainer.engines import DDPEngine  # noqa: E402
from trainer.models import ImageClassifier, build_backbone, count_macs, flop_counter  # noqa: E402
from pruning.methods import get_method  # noqa: E402
from trainer.stages.sources import make_prompt  # noqa: E402  (imports FFCV)

KINDS = ("dense", "pass", "vpns", "finetune")
# Dense bf16 tensor-core peak in TFLOP/s (no 2:4 sparsity), from NVIDIA's data sheets.
# Matched against torch.cuda.get_device_name() in this order (the first substring found wins).
PEAK_BF16_TFLOPS = (
    ("H100 NVL", None),        # not in this table: pass --peak-tflops
    ("H100 PCIe", 756.0),
    ("H100", 989.0),           # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),           # SXM4 and PCIe
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),            # after A100/A800
)


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


# --------------------------------------------------------------------------- machine


def gpu_info(device: torch.device) -> dict:
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2 ** 30,
            "multiprocessors": p.multi_processor_count, "visible_devices": torch.cuda.device_count(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


# --------------------------------------------------------------------------- building the steps


def gpu_stage_config(args, method: str, runs_dir: str):
    """The run config the launcher would build, with the GPU engine settings made explicit."""
    return stage_config(args.model, method, device=args.device, res=args.res, batch=args.batch, runs_dir=runs_dir,
                        overrides=["engine.precision=bf16", "engine.channels_last=true",
                                   f"pruning.flops_ratio={args.flops_ratio}", f"pruning.round_to={args.round_to}"])


def build_dense(args, runs_dir: str) -> TrainStep:
    cfg = gpu_stage_config(args, "dense", runs_dir)
    engine = DDPEngine(cfg.engine, DistEnv())
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(args.model, args.classes, args.res)
    macs = count_macs(backbone, args.res)
    model = engine.prepare_module(ImageClassifier(backbone))
    step = TrainStep(cfg, engine, model, [p for p in model.parameters() if p.requires_grad], cfg.dense)
    step.macs = macs
    return step


def build_pass(args, runs_dir: str) -> TrainStep:
    cfg = gpu_stage_config(args, "pass", runs_dir)
    engine = DDPEngine(cfg.engine, DistEnv())
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(args.model, args.classes, args.res)
    macs = count_macs(backbone, args.res)  # the masked network runs every channel: the dense cost
    step = pass_search_step(cfg, engine, backbone)
    step.macs = macs
    return step


def build_vpns(args, runs_dir: str) -> TrainStep:
    cfg = gpu_stage_config(args, "vpns", runs_dir)
    engine = DDPEngine(cfg.engine, DistEnv())
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(args.model, args.classes, args.res)
    macs = count_macs(backbone, args.res)  # masks multiply: the dense cost, once per view
    step = vpns_search_step(cfg, engine, backbone)
    step.macs = macs
    return step


def finetune_structure(args, cfg, dense) -> dict:
    """A structure.json: from --structure PATH, or chosen now by a structured baseline (search.py's way)."""
    if args.structure not in ("uniform", "l1", "random"):
        structure = json.loads(Path(args.structure).read_text())
        found = (structure.get("arch"), structure.get("res"), structure.get("num_classes"))
        if found != (args.model, args.res, args.classes):
            sys.exit(f"error: {args.structure} is for {found[0]} at {found[1]}px with {found[2]} classes, "
                     f"not {args.model} at {args.res}px with {args.classes} (--model/--res/--classes)")
        return structure
    graph = build_graph(dense, cfg.data.res, residual=cfg.pruning.residual)
    flops = FlopsModel(dense, graph, cfg.data.res)
    kept = select_baseline(args.structure, group_statistics(dense, graph), flops, cfg.pruning.flops_ratio,
                           min_keep=cfg.pruning.min_keep, round_to=cfg.pruning.round_to, seed=cfg.seed)
    return make_structure(graph, kept, arch=args.model, res=cfg.data.res, num_classes=args.classes, flops=flops)


def build_finetune(args, runs_dir: str) -> TrainStep:
    cfg = gpu_stage_config(args, "pass", runs_dir)
    engine = DDPEngine(cfg.engine, DistEnv())
    torch.manual_seed(cfg.seed)
    dense = build_backbone(args.model, args.classes, args.res)
    structure = finetune_structure(args, cfg, dense)
    convert_attention(dense)
    pruned = extract(dense, structure)
    prompt = make_prompt(cfg) if get_method(cfg.method.name).finetune_prompt(cfg) else None
    macs = count_macs(pruned, args.res)
    model = engine.prepare_module(ImageClassifier(pruned, prompt))
    step = TrainStep(cfg, engine, model, [p for p in model.parameters() if p.requires_grad], cfg.finetune)
    step.macs = macs
    step.structure = {"source": args.structure, "flops_ratio": structure["flops_ratio"],
                      "round_to": cfg.pruning.round_to,
                      "kept_widths": {g["name"]: [g["kept_width"], g["size"]] for g in structure["groups"]}}
    return step


BUILDERS = {"dense": build_dense, "pass": build_pass, "vpns": build_vpns, "finetune": build_finetune}


# --------------------------------------------------------------------------- measuring


def counted_flops(step: TrainStep, images, labels) -> int:
    """FLOPs of one whole training step (forward + backward), torch's count."""
    with flop_counter() as counter:
        step(images, labels, timed=False)
    sync(step.engine.device)
    return int(counter.get_total_flops())


def synthetic_batch(args, steps: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels made once on the device, in the memory format the loader hands over."""
    device = next(iter(steps.values())).engine.device
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8, generator=gen,
                           device=device)
    if next(iter(steps.values())).engine.channels_last:  # as ToTorchImage(channels_last=True) hands them over
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, args.classes, (args.batch,), generator=gen, device=device)


def run(args, steps: dict | None = None) -> dict:
    """Times `steps` (kind -> TrainStep; default: built from args.kinds)."""
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    results, peak_mem = {}, {}
    if steps is None:
        with tempfile.TemporaryDirectory() as runs_dir:  # load_config looks for a stored run there: none
            steps = {kind: BUILDERS[kind](args, runs_dir) for kind in args.kinds}
    images, labels = synthetic_batch(args, steps)

    for kind, step in steps.items():  # warm-up (allocator, cuDNN algorithms, optimizer state), peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step(images, labels, timed=False)
        sync(device)
        if device.type == "cuda":
            peak_mem[kind] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    flops = {kind: counted_flops(step, images, labels) / args.batch for kind, step in steps.items()}

    rates = {kind: [] for kind in steps}
    order = list(steps)
    for r in range(args.repeats):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for kind in rotated:
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):  # untimed steps: no sync between them, as in training (see TrainStep)
                steps[kind](images, labels, timed=False)
            sync(device)
            rates[kind].append(args.steps * args.batch / (time.perf_counter() - start))
        print(f"  round {r + 1}/{args.repeats}: " + "  ".join(f"{k} {rates[k][-1]:.1f} img/s" for k in order),
              flush=True)

    for kind, step in steps.items():
        ips = statistics.median(rates[kind])
        results[kind] = {
            "images_per_second": ips, "images_per_second_all": rates[kind],
            "forward_macs_per_image": step.macs, "counted_flops_per_image": flops[kind],
            "convention_flops_per_image": 6 * step.macs, "achieved_tflops": ips * flops[kind] / 1e12,
            "achieved_tflops_convention": ips * 6 * step.macs / 1e12, "trainable_parameters": step.trainable,
            "optimizer": step.engine.optimizer.__class__.__name__, "peak_memory_gib": peak_mem.get(kind),
            **({"structure": step.structure} if hasattr(step, "structure") else {}),
        }
    return results


# --------------------------------------------------------------------------- report


def print_table(results: dict, args, gpu: dict | None, peak: float | None) -> list[str]:
    where = (f"{gpu['name']}, 1 GPU" if gpu else
             f"CPU SMOKE TEST ({torch.get_num_threads()} threads): NOT a GPU figure")
    lines = [f"{args.model} at {args.res}px, batch {args.batch}, bf16 autocast, channels_last, {where}; "
             f"median of {args.repeats} rounds of {args.steps} steps (in turns, after {args.warmup} warm-up steps)"]
    if gpu:
        lines.append(f"peak bf16 dense: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    head = f"{'step':<10}{'img/s':>10}{'GFLOP/img':>11}{'6xMACs':>9}{'TFLOP/s':>9}"
    if gpu:
        head += f"{'% peak':>8}{'6xMACs %':>10}{'mem GiB':>9}"
    lines.append(head)
    for kind, r in results.items():
        line = (f"{kind:<10}{r['images_per_second']:>10.1f}{r['counted_flops_per_image'] / 1e9:>11.2f}"
                f"{r['convention_flops_per_image'] / 1e9:>9.2f}{r['achieved_tflops']:>9.2f}")
        if gpu:
            pct = f"{100 * r['achieved_tflops'] / peak:>7.1f}%" if peak else f"{'-':>8}"
            pct6 = f"{100 * r['achieved_tflops_convention'] / peak:>9.1f}%" if peak else f"{'-':>10}"
            line += f"{pct}{pct6}{r['peak_memory_gib']:>9.1f}"
        lines.append(line)
    if "finetune" in results:
        s = results["finetune"]["structure"]
        lines.append(f"finetune network: {s['source']} channels at {s['flops_ratio']:.3f} of the dense FLOPs "
                     f"(round_to {s['round_to']})")
    print("\n".join(lines))
    return lines


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default) or cpu: a smoke test of the code path, not a GPU figure")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--res", type=int, default=176)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 256 on a GPU, 2 on CPU)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--flops-ratio", type=float, default=0.5, help="finetune network: kept FLOPs / dense FLOPs")
    parser.add_argument("--structure", default="uniform",
                        help="finetune channels: uniform, l1 or random (a baseline's choice now), or a structure.json")
    parser.add_argument("--round-to", type=int, default=1, help="pruning.round_to of the finetune network (8: "
                                                                 "GPU-friendly widths)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 5 on a GPU, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps of each kind (default: 10 GPU, 1 CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s "
                                                                        "(default: from the built-in table)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its algorithms (the trainer leaves torch's default, off)")
    args = parse_args(parser, "gpu_throughput")
    cuda = args.device == "cuda"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    args.batch = args.batch or (256 if cuda else 2)
    args.repeats = args.repeats or (5 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    info = machine_info()
    report = {"benchmark": "gpu_throughput", **info, "device": args.device, "model": args.model, "res": args.res,
              "batch": args.batch, "classes": args.classes, "precision": "bf16 autocast",
              "memory_format": "channels_last", "steps": args.steps, "repeats": args.repeats,
              "warmup": args.warmup, "statistic": "median images/s over rounds"}

    if cuda and not torch.cuda.is_available():
        print(f"no GPU here: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; "
              f"nothing measured (--device cpu runs a CPU smoke test)")
        report.update(gpu=None, results=None, table=None)
        write_report(args.out, report)
        return

    gpu = gpu_info(torch.device("cuda", 0)) if cuda else None
    peak = (args.peak_tflops or peak_tflops(gpu["name"])) if gpu else None
    print(f"{gpu['name'] if gpu else 'CPU smoke test, not a GPU figure: ' + info['cpu_model']}, "
          f"torch {info['torch']}, {info['date']}")
    results = run(args)
    table = print_table(results, args, gpu, peak)
    report.update(gpu=gpu, peak_bf16_tflops=peak, peak_source=("--peak-tflops" if args.peak_tflops else "table")
                  if peak else None, results=results, table=table,
                  note=None if gpu else "CPU smoke test of the code path: not a GPU figure, no peak fraction")
    if gpu and peak:
        for r in results.values():
            r["fraction_of_peak"] = r["achieved_tflops"] / peak
            r["fraction_of_peak_convention"] = r["achieved_tflops_convention"] / peak
    write_report(args.out, report)


if __name__ == "__main__":
    main()

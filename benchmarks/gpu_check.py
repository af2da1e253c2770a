#!/usr/bin/env python
"""The CUDA path end to end, and what only a GPU can measure, in one command (a few minutes on one GPU).

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]
    python benchmarks/gpu_check.py --device cpu     # the same code on the CPU at toy sizes (run by the tests)

1. The pipeline, through the launcher (slurm/launch.py's main, in this process) on the embedded synthetic
   data, with the engine's GPU settings (bf16 autocast, channels_last, FFCV decoding onto the device):

     dense      stage=dense                                  ResNet-18, 64 px, 200 steps of 128 images
     pass       stage=all method=pass dense_run=dense        search, extraction, finetune, eval
     vpns       stage=all method=vpns dense_run=dense        search, finetune, eval
     zero2      stage=search method=pass engine=deepspeed engine.zero_stage=2   (one process)
     ddp_nccl   with two or more GPUs: the PASS search under torchrun, two processes, NCCL; with one GPU an
                NCCL process group of one process and a DistributedDataParallel step through it (NCCL
                refuses two ranks on one GPU)

   Each stage must publish its result with every logged loss finite; on a GPU the trained networks (dense,
   finetune, eval) must also reach twice chance top-1 and the masked search networks beat chance.

2. Measurements, with benchmarks/gpu_throughput.py's training steps (ResNet-50, 176 px, batch 256, bf16,
   channels_last, synthetic images already on the device):

     dense training images/s; PASS search step / dense step; VPNs sub-step / dense step (a VPNs batch is
     two optimizer steps); finetune images/s of the network cut to half the FLOPs with round_to=8;
     host syncs per training step: torch.cuda.set_sync_debug_mode("warn") over a block of steps, where
     training does not sync on purpose (no clock reads);
     pruned ResNet-50 inference speedup at batch 256 (bf16, channels_last) at FLOPs ratios 0.5 and 0.3
     with round_to=8 (l1 channels of random weights: the speed depends on widths, not values) against the
     FLOPs ideal 1 / ratio.

Prints a table and writes JSON (--out). Without a CUDA device it says so, writes {"gpu": null} and exits 0;
`--device cpu` runs everything at toy sizes (ResNet-18 at 32 px, a few steps) to exercise the code, and its
figures are not GPU figures.
"""
from __future__ import annotations

import argparse
import contextlib
from collections import Counter
import io
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import gpu_throughput  # noqa: E402
from benchmarks.common import argument_parser, machine_info, parse_args, sync, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 0.1  # the synthetic data's 10 classes

# (GPU, CPU smoke) sizes of the pipeline runs.
PIPELINE_SIZES = {
    "cuda": ["model=resnet18", "data.synthetic_image_size=64", "data.res=64", "data.synthetic_train_size=25600",
             "data.synthetic_val_size=2560", "data.batch_size=128", "engine.precision=bf16",
             "engine.channels_last=true"],
    "cpu": ["model=resnet18", "data.synthetic_image_size=32", "data.res=32", "data.synthetic_train_size=64",
            "data.synthetic_val_size=32", "data.batch_size=32", "data.num_workers=1", "data.jit=false",
            "data.val_crop_ratio=1.0"],
}
EPOCHS = ["dense.epochs=1", "search.epochs=1", "finetune.epochs=1"]


# --------------------------------------------------------------------------- 1. the pipeline


def launcher(tokens: list[str]) -> tuple[int, str]:
    """slurm/launch.py's main in this process: (exit code, everything it printed)."""
    from slurm.launch import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(t) for t in tokens])
    return code, out.getvalue()


def stage_checks(run: Path, stages: list[str], gpu: bool) -> dict:
    """What each stage of a finished run shows: its result, finite losses, top-1 against chance."""
    checks = {}
    for stage in stages:
        summary_path = run / stage / ("summary.json" if stage == "eval" else "result/summary.json")
        metrics = run / stage / "metrics.jsonl"
        losses = [json.loads(line).get("loss") for line in metrics.read_text().splitlines()] if metrics.exists() else []
        finite = all(loss is None or math.isfinite(loss) for loss in losses)
        if not summary_path.exists():
            checks[stage] = {"ok": False, "why": "no result"}
            continue
        summary = json.loads(summary_path.read_text())
        top1 = summary.get("top1")
        floor = 100 * CHANCE * (1 if stage == "search" else 2) if gpu else None
        ok = finite and (floor is None or (top1 is not None and top1 > floor))
        checks[stage] = {"ok": ok, "top1": top1, "logged_losses": len(losses), "losses_finite": finite,
                         "top1_floor": floor, "images_per_second": summary.get("images_per_second")}
        if not ok:
            checks[stage]["why"] = "a logged loss is not finite" if not finite else f"top-1 {top1} <= {floor}"
    return checks


def nccl_one_process() -> dict:
    """One GPU: an NCCL group of one process, an all-reduce, a broadcast and one DistributedDataParallel
    step through it (the launcher only builds a process group for two or more processes)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.ones(4, device="cuda")
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        model = DistributedDataParallel(torch.nn.Linear(8, 2).cuda(), device_ids=[torch.cuda.current_device()])
        model(torch.randn(16, 8, device="cuda")).square().mean().backward()
        grad = model.module.weight.grad
        return {"ok": bool(torch.isfinite(grad).all()) and float(x.sum()) == 4.0,
                "what": "NCCL group of 1 process: all_reduce, broadcast, one DDP backward",
                "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}
    finally:
        dist.destroy_process_group()


def ddp_two_processes(base: list[str]) -> dict:
    """Two or more GPUs: the PASS search under torchrun with two NCCL processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "slurm" / "launch.py"), *base, "stage=search", "method=pass", "dense_run=dense", "run=ddp2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {"ok": done.returncode == 0, "what": "PASS search, torchrun --nproc_per_node=2, NCCL",
            **({} if done.returncode == 0 else {"why": done.stderr[-1500:]})}


def pipeline(device: str, runs: Path, say) -> dict:
    gpu = device == "cuda"
    workers = f"data.num_workers={min(8, os.cpu_count() or 1)}" if gpu else None
    base = [f"runs_dir={runs}", f"data.beton_dir={runs / 'betons'}", f"engine.device={device}", "log.progress=false",
            *PIPELINE_SIZES[device], *([workers] if workers else []), *EPOCHS]
    runs_to_do = [
        ("dense", ["stage=dense", "method=pass", "run=dense"], ["dense"]),
        ("pass", ["stage=all", "method=pass", "dense_run=dense", "run=pass"], ["search", "finetune", "eval"]),
        ("vpns", ["stage=all", "method=vpns", "dense_run=dense", "run=vpns"], ["search", "finetune", "eval"]),
        ("zero2", ["stage=search", "method=pass", "dense_run=dense", "engine=deepspeed", "engine.zero_stage=2",
                   "run=zero2"], ["search"]),
    ]
    results = {}
    for name, tokens, stages in runs_to_do:
        start = time.perf_counter()
        code, printed = launcher([*base, *tokens])
        seconds = time.perf_counter() - start
        checks = stage_checks(runs / tokens[-1].split("=", 1)[1], stages, gpu) if code == 0 else {}
        ok = code == 0 and all(c["ok"] for c in checks.values())
        results[name] = {"ok": ok, "exit_code": code, "seconds": seconds, "stages": checks,
                         **({} if ok else {"output_tail": printed[-2000:]})}
        say(f"  {name:<8} {'ok' if ok else 'FAILED'}  {seconds:6.1f} s  " + "  ".join(
            f"{s} top-1 {c.get('top1', float('nan')):.1f}%" for s, c in checks.items()))
    if gpu:
        start = time.perf_counter()
        try:
            check = ddp_two_processes(base) if torch.cuda.device_count() >= 2 else nccl_one_process()
        except Exception as e:  # noqa: BLE001 - the check reports what broke, the others still run
            check = {"ok": False, "why": f"{type(e).__name__}: {e}"}
        results["ddp_nccl"] = {**check, "seconds": time.perf_counter() - start}
        say(f"  ddp_nccl {'ok' if check['ok'] else 'FAILED'}  {check.get('what', check.get('why'))}")
    return results


# --------------------------------------------------------------------------- 2. measurements


def count_syncs(step, images, labels, steps: int) -> dict | None:
    """Host syncs torch reports (set_sync_debug_mode("warn")) over `steps` training steps; None on CPU."""
    if images.device.type != "cuda":
        return None
    sync(images.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step(images, labels, timed=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(images.device)
    found = Counter(str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message))
    return {"per_step": found.total() / steps, "steps": steps, "messages": dict(found.most_common(8))}


def step_measurements(device: str, say) -> dict:
    cuda = device == "cuda"
    args = argparse.Namespace(
        device=device, model="resnet50" if cuda else "resnet18", res=176 if cuda else 32, batch=256 if cuda else 2,
        classes=1000 if cuda else 10, kinds=list(gpu_throughput.KINDS), flops_ratio=0.5, structure="uniform",
        round_to=8, steps=20 if cuda else 1, repeats=5 if cuda else 1, warmup=10 if cuda else 1)
    with tempfile.TemporaryDirectory() as runs_dir:
        steps = {kind: gpu_throughput.BUILDERS[kind](args, runs_dir) for kind in args.kinds}
    results = gpu_throughput.run(args, steps)
    images, labels = gpu_throughput.synthetic_batch(args, steps)
    syncs = {kind: count_syncs(step, images, labels, 5 if cuda else 1) for kind, step in steps.items()}
    dense = results["dense"]["images_per_second"]
    ratios = {"pass_step_over_dense_step": dense / results["pass"]["images_per_second"],
              "vpns_substep_over_dense_step": dense / (2 * results["vpns"]["images_per_second"]),
              "finetune_images_per_second_over_dense": results["finetune"]["images_per_second"] / dense}
    say(f"  {args.model} {args.res}px batch {args.batch}: dense {dense:.1f} img/s; PASS step / dense "
        f"{ratios['pass_step_over_dense_step']:.2f}x; VPNs sub-step / dense {ratios['vpns_substep_over_dense_step']:.2f}x")
    return {"settings": vars(args), "results": results, "ratios": ratios, "host_syncs": syncs}


@torch.no_grad()
def inference_ms(model, images, repeats: int, warmup: int, autocast: bool) -> float:
    """Median ms of one forward pass, each timed between two syncs of the model's device."""
    times = []
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        for i in range(warmup + repeats):
            sync(images.device)
            start = time.perf_counter()
            model(images)
            sync(images.device)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def pruned_speedup(device: str, say) -> dict:
    from benchmarks.real_speedup import RES, pruned_networks

    cuda = device == "cuda"
    arch, batch = ("resnet50", 256) if cuda else ("resnet18", 2)
    nets, meta = pruned_networks(arch, [0.5, 0.3], ["l1"], [8], say=lambda m: None)
    dev = torch.device(device, 0) if cuda else torch.device("cpu")
    images = torch.rand(batch, 3, RES, RES, device=dev)
    memory = torch.channels_last if cuda else torch.contiguous_format
    images = images.contiguous(memory_format=memory)
    ms = {}
    for r in range(3 if cuda else 1):  # networks in turns, rounds rotate: load hits all alike
        for name, model in nets.items():
            model = model.to(dev, memory_format=memory).eval()
            ms.setdefault(name, []).append(inference_ms(model, images, 10 if cuda else 1, 3 if cuda else 0, cuda))
    dense = statistics.median(ms["dense"])
    rows = {}
    for name in nets:
        median = statistics.median(ms[name])
        ratio = meta[name]["flops_ratio"]
        rows[name] = {"median_ms": median, "flops_ratio": ratio, "speedup": dense / median,
                      "ideal_speedup": 1 / ratio, "of_ideal": (dense / median) * ratio}
    say("  " + "; ".join(f"{n}: {r['speedup']:.2f}x of ideal {r['ideal_speedup']:.2f}x" for n, r in rows.items()
                         if n != "dense"))
    return {"arch": arch, "batch": batch, "res": RES, "precision": "bf16 autocast" if cuda else "fp32",
            "networks": rows}


# --------------------------------------------------------------------------- report


def table(report: dict) -> list[str]:
    lines = [f"gpu_check on {report['gpu']['name'] if report['gpu'] else 'CPU (smoke test, not GPU figures)'}, "
             f"torch {report['torch']} (CUDA {report['torch_cuda']}), {report['date']}, {report['seconds']:.0f} s",
             f"{'pipeline':<10}{'ok':<8}{'seconds':>8}  top-1 per stage"]
    for name, r in report["pipeline"].items():
        tops = "  ".join(f"{s} {c.get('top1', float('nan')):.1f}%" for s, c in r.get("stages", {}).items())
        lines.append(f"{name:<10}{'ok' if r['ok'] else 'FAILED':<8}{r['seconds']:>8.1f}  {tops or r.get('what', '')}")
    m = report["steps"]
    s = m["settings"]
    lines.append(f"steps: {s['model']} {s['res']}px batch {s['batch']}, median of {s['repeats']} rounds")
    lines.append(f"{'step':<10}{'img/s':>10}{'syncs/step':>12}")
    for kind, r in m["results"].items():
        syncs = m["host_syncs"][kind]
        lines.append(f"{kind:<10}{r['images_per_second']:>10.1f}{syncs['per_step'] if syncs else float('nan'):>12.1f}")
    for key, value in m["ratios"].items():
        lines.append(f"{key:<34}{value:>7.2f}x")
    sp = report["speedup"]
    lines.append(f"pruned {sp['arch']} inference, batch {sp['batch']}, {sp['res']}px, {sp['precision']}:")
    for name, r in sp["networks"].items():
        lines.append(f"  {name:<12}{r['median_ms']:>9.2f} ms  FLOPs {r['flops_ratio']:.3f}  speedup "
                     f"{r['speedup']:.2f}x of ideal {r['ideal_speedup']:.2f}x ({100 * r['of_ideal']:.0f}%)")
    return lines


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default) or cpu: the same code at toy sizes, not GPU figures")
    args = parse_args(parser, "gpu_check")
    report = {"benchmark": "gpu_check", **machine_info(), "device": args.device}
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no GPU here: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; nothing "
              f"checked (--device cpu runs the same code at toy sizes)")
        write_report(args.out, {**report, "gpu": None})
        return 0
    cuda = args.device == "cuda"
    report["gpu"] = gpu_throughput.gpu_info(torch.device("cuda", 0)) if cuda else None
    start = time.perf_counter()
    say = lambda m: print(m, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as runs:
        say("pipeline:")
        report["pipeline"] = pipeline(args.device, Path(runs), say)
    say("training steps:")
    report["steps"] = step_measurements(args.device, say)
    say("pruned inference:")
    report["speedup"] = pruned_speedup(args.device, say)
    report["seconds"] = time.perf_counter() - start
    report["ok"] = all(r["ok"] for r in report["pipeline"].values())
    report["table"] = table(report)
    print("\n".join(report["table"]))
    write_report(args.out, report)
    if not report["ok"]:
        print("gpu_check: FAILED: " + ", ".join(n for n, r in report["pipeline"].items() if not r["ok"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

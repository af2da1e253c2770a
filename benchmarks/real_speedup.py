#!/usr/bin/env python
"""Real CPU speedup of channel-pruned ResNet-50, VGG-16 (BN) and ViT-B/16 next to their FLOPs reduction.

    flock /tmp/bench.lock python benchmarks/real_speedup.py [--models resnet50 vgg16_bn vit_b_16]
        [--ratios 0.3 0.5 0.7] [--round-to 1] [--repeats1 20 --repeats32 3] [--out ...]

For every model (torchvision architecture, 224 px, 1000 classes, built with
the project's `build_backbone`), the pruned networks are made exactly the
way the search stage makes them, without any training:

    build_graph -> FlopsModel -> per-channel scores -> choose_channels (global
    offset bisected to meet ratio * dense FLOPs, min_keep, round_to)
    -> make_structure -> extract

with the project's default pruning settings (`pruning.residual=true`,
`min_keep=0.05`, `round_to=1`; `--round-to 1 8` adds GPU-friendly widths as
an extra variant). The scores:

* `l1`: `select_baseline("l1", group_statistics(...))`, as the search stage
  does for the baseline.
* `pass`: the logits of the PASS hypernetwork (`PassSearchNetwork`, built as
  the search stage builds it: seed `cfg.seed` set before the backbone, the
  default `pass.*` settings, the default pad prompt, which the hypernetwork
  reads as `program * frame_mask`), AT ITS INITIALISATION: nothing is
  trained. Its logits start at about +3 with small per-channel noise, so
  these structures are close to a noisy uniform cut. They show how
  PASS-extracted networks of a given FLOPs ratio run, not which widths a
  trained search would pick.

No pretrained weights are used (none are available offline): every network
has random weights, and the l1 importances are those of the random
initialisation, so the l1 structures are not the ones a trained network would
give either. Latency depends only on the layer shapes, not the weight values,
so the timings hold for any weights with these kept widths; which widths a
trained search keeps does change the figures (it decides where the cut falls).

Timing: `trainer.latency.compare_latency` (eval mode, no grad, CPU, all cores:
every network of one model runs once per round, in turns, and the median over
rounds is reported). ViT networks run with the project's `SelfAttention`
(`pruning.attention.convert_attention`, what extraction produces); the dense
ViT is timed that way too, and, as a reference, also with torchvision's own
`nn.MultiheadAttention` ("dense-mha"; its MACs are taken from the converted
dense network: torch's counter misses the fused kernel). FLOPs are multiply-accumulates counted
by `trainer.models.count_macs` (torch's FLOP counter). At every timed batch
(`--breakdown-batch` to choose) one more forward of every network is
profiled and its time split by top-level op: convolution / matmul /
attention (the ops the FLOPs count) and norms, activations, pooling,
residual adds and the rest, which FLOPs do not predict; next to it, the
elements each forward writes (activation traffic) relative to the dense
network.

Prints a table and writes JSON (--out) with machine, date and versions.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from pruning.baselines import select_baseline  # noqa: E402
from pruning.extract import choose_channels, extract, make_structure  # noqa: E402
from pruning.pass_network import PassSearchNetwork  # noqa: E402
from pruning.stats import group_statistics  # noqa: E402
from trainer.config.schema import root_config  # noqa: E402
from trainer.latency import compare_latency  # noqa: E402
from trainer.models import build_backbone, count_macs, count_parameters  # noqa: E402
from trainer.stages.sources import make_prompt  # noqa: E402

MODELS = ("resnet50", "vgg16_bn", "vit_b_16")
METHODS = ("pass", "l1")
RES, CLASSES = 224, 1000

# Top-level profiler op -> category (first match wins); the first three are what count_macs counts.
CATEGORIES = (
    ("conv", ("aten::conv2d", "aten::convolution")),
    ("matmul", ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul")),
    ("attention", ("aten::scaled_dot_product_attention", "aten::_native_multi_head_attention")),
    ("norm", ("aten::batch_norm", "aten::layer_norm")),
    ("activation", ("aten::relu", "aten::relu_", "aten::gelu")),
    ("pool", ("aten::max_pool2d", "aten::adaptive_avg_pool2d")),
    ("add", ("aten::add", "aten::add_")),
)
FLOP_CATEGORIES = ("conv", "matmul", "attention")


# --------------------------------------------------------------------------- networks


def pruned_networks(arch: str, ratios: list[float], methods: list[str], round_tos: list[int],
                    say) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The dense backbone and every pruned network of `arch`, with their metadata."""
    cfg = root_config()
    p = cfg.pruning
    torch.manual_seed(cfg.seed)   # as the search stage: seed, then the backbone, then the hypernetwork
    start = time.perf_counter()
    backbone = build_backbone(arch, CLASSES, RES)
    mha_dense = copy.deepcopy(backbone) if arch.startswith("vit") else None
    # The search stage's PASS network (converts ViT attention in place, builds the graph and FLOPs model).
    prompt = make_prompt(cfg) if cfg["pass"].use_prompt else None
    net = PassSearchNetwork(backbone, res=RES, prompt=prompt, pass_cfg=cfg["pass"], flops_ratio=ratios[0],
                            residual=p.residual)
    net.eval()
    with torch.no_grad():
        logits = [l.cpu() for l in net.logits()]
    net.masks.remove()   # as search does before extraction: no hooks travel with the backbone
    graph, flops = net.graph, net.flops
    stats = group_statistics(backbone, graph)
    say(f"{arch}: {len(graph.groups)} groups, PASS logits at initialisation "
        f"{min(float(l.min()) for l in logits):.3f}..{max(float(l.max()) for l in logits):.3f} "
        f"({time.perf_counter() - start:.1f} s)")

    nets = {"dense": backbone}
    meta = {"dense": {"method": "dense", "ratio": 1.0, "round_to": None,
                      "attention": "SelfAttention" if mha_dense is not None else None}}
    if mha_dense is not None:
        nets["dense-mha"] = mha_dense
        meta["dense-mha"] = {"method": "dense-mha", "ratio": 1.0, "round_to": None,
                             "attention": "torchvision nn.MultiheadAttention"}
    for round_to in round_tos:
        for ratio in ratios:
            for method in methods:
                if method == "pass":
                    kept = choose_channels(logits, flops, ratio, min_keep=p.min_keep, round_to=round_to)
                else:
                    kept = select_baseline(method, stats, flops, ratio, min_keep=p.min_keep, round_to=round_to,
                                           seed=cfg.seed)
                structure = make_structure(graph, kept, arch=arch, res=RES, num_classes=CLASSES, flops=flops)
                name = f"{method}@{ratio:g}" + (f"/r{round_to}" if round_to != 1 else "")
                nets[name] = extract(backbone, structure)
                meta[name] = {"method": method, "ratio": ratio, "round_to": round_to,
                              "flops_model_ratio": structure["flops_ratio"],
                              "kept_widths": {g["name"]: [g["kept_width"], g["size"]] for g in structure["groups"]}}
    for name, m in nets.items():
        m.eval()
        meta[name]["macs"] = count_macs(m, RES)
        meta[name]["params"] = count_parameters(m)
        meta[name]["written_elements"] = written_elements(m)
    if "dense-mha" in meta:
        # torch's FLOP counter misses most of the fused MultiheadAttention kernel; the function is the
        # converted dense network's.
        meta["dense-mha"]["macs"] = meta["dense"]["macs"]
    for name in nets:
        meta[name]["flops_ratio"] = meta[name]["macs"] / meta["dense"]["macs"]
    say(f"{arch}: {len(nets)} networks built ({time.perf_counter() - start:.1f} s)")
    return nets, meta


# --------------------------------------------------------------------------- profile


class _Written(TorchDispatchMode):
    """Counts the tensor elements every non-view aten op writes (allocations and views left out)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func.__name__.startswith(("empty", "zeros")):
            self.elements += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@torch.no_grad()
def written_elements(model: nn.Module) -> int:
    """Elements written by one forward of one image: the activation traffic FLOPs do not count."""
    with _Written() as counter:
        model(torch.zeros(1, 3, RES, RES))
    return counter.elements


def categorise(op: str) -> str:
    for category, names in CATEGORIES:
        if op in names:
            return category
    return "other"


@torch.no_grad()
def breakdown(models: dict[str, nn.Module], batch: int) -> dict[str, dict]:
    """CPU time of one forward per network (after one untimed pass), by category of top-level op.

    Top-level: aten ops not called from another aten op (`linear`, with the bias copy and the
    `addmm` inside it, counts as one matmul), timed inclusively on the calling thread.
    """
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(batch, 3, RES, RES)
    out = {}
    for name, model in models.items():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
        times: dict[str, float] = defaultdict(float)
        ops = 0
        for event in prof.events():
            if event.cpu_parent is None and event.name.startswith("aten::"):
                times[categorise(event.name)] += event.cpu_time_total / 1000   # ms
                ops += 1
        total = sum(times.values())
        out[name] = {"total_ms": total, "ops": ops, "ms": dict(times),
                     "flop_ops_ms": sum(times[c] for c in FLOP_CATEGORIES)}
    return out


# --------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(),
            "cpu": cpu or platform.processor(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "mkldnn": torch.backends.mkldnn.is_available(),
            "git_commit": commit}


def table(rows: list[dict], batches: list[int]) -> str:
    head = f"{'model':<10}{'method':<11}{'target':>7}{'FLOPs ratio':>12}{'params M':>9}"
    head += "".join(f"{f'ms b{b}':>10}" for b in batches)
    head += "".join(f"{f'speedup b{b}':>12}" for b in batches) + f"{'ideal':>7}"
    lines = [head]
    for r in rows:
        target = "-" if r["method"].startswith("dense") else f"{r['ratio']:g}"
        method = r["method"] + (f"/r{r['round_to']}" if r.get("round_to") not in (None, 1) else "")
        line = f"{r['model']:<10}{method:<11}{target:>7}{r['flops_ratio']:>12.3f}{r['params'] / 1e6:>9.2f}"
        timing = [r["timing"].get(str(b)) for b in batches]
        line += "".join(f"{t['median_ms']:>10.1f}" if t else f"{'-':>10}" for t in timing)
        line += "".join(f"{t['speedup']:>11.2f}x" if t else f"{'-':>12}" for t in timing)
        line += f"{1 / r['flops_ratio']:>6.2f}x"
        lines.append(line)
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    cats = [c for c, _ in CATEGORIES] + ["other"]
    dense = {r["model"]: r["written_elements"] for r in rows if r["name"] == "dense"}
    lines = [f"{'model':<10}{'network':<13}{'batch':>6}{'total ms':>10}{'ops':>6}"
             + "".join(f"{c:>11}" for c in cats) + f"{'GMAC/s*':>9}{'written':>9}"]
    for r in rows:
        for b, d in sorted(r.get("breakdown", {}).items(), key=lambda kv: int(kv[0])):
            total = d["total_ms"]
            eff = r["macs"] * int(b) / (d["flop_ops_ms"] / 1000) / 1e9 if d["flop_ops_ms"] else 0.0
            lines.append(f"{r['model']:<10}{r['name']:<13}{b:>6}{total:>10.1f}{d['ops']:>6}"
                         + "".join(f"{100 * d['ms'].get(c, 0.0) / total:>10.1f}%" for c in cats) + f"{eff:>9.1f}"
                         + f"{r['written_elements'] / dense[r['model']]:>9.3f}")
    lines.append("(% of one profiled forward's time in top-level ops by kind; ops: top-level aten ops run; "
                 "GMAC/s*: MACs / time in conv+matmul+attention;\n written: elements the forward writes (activations, "
                 "batch 1) / the dense network's)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--round-to", nargs="+", type=int, default=[1],
                        help="pruning.round_to values (1 = project default; 8 adds GPU-friendly widths)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats1", type=int, default=20, help="timed rounds at batch 1")
    parser.add_argument("--warmup1", type=int, default=3)
    parser.add_argument("--repeats32", type=int, default=3, help="timed rounds at any batch > 1")
    parser.add_argument("--warmup32", type=int, default=1)
    parser.add_argument("--no-mha-dense", action="store_true",
                        help="do not time ViT's dense network with torchvision's nn.MultiheadAttention too")
    parser.add_argument("--breakdown-batch", nargs="*", type=int, default=None,
                        help="batches at which one forward of every network is profiled by op category "
                             "(default: every timed batch; the flag alone: none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (default: all cores; importing FFCV would otherwise leave 1)")
    parser.add_argument("--out", default="benchmarks/results/real_speedup.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # after the imports: FFCV's import sets torch to 1 thread
    breakdown_batches = args.batches if args.breakdown_batch is None else args.breakdown_batch

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "command": " ".join([Path(sys.executable).name] + sys.argv),
              "settings": {"res": RES, "classes": CLASSES, "ratios": args.ratios, "round_to": args.round_to,
                           "batches": args.batches, "repeats": {"1": args.repeats1, ">1": args.repeats32},
                           "warmup": {"1": args.warmup1, ">1": args.warmup32},
                           "pruning": {"residual": True, "min_keep": 0.05},
                           "weights": "random initialisation; PASS hypernetwork untrained (see docstring)"},
              "rows": []}
    report["load_average_at_start"] = os.getloadavg()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        say(f"warning: load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores: other processes will "
            f"distort the timings (see load_average in the JSON)")
    start = time.perf_counter()
    for arch in args.models:
        nets, meta = pruned_networks(arch, args.ratios, args.methods, args.round_to, say)
        if args.no_mha_dense:
            nets.pop("dense-mha", None)
        timing = {}
        for batch in args.batches:
            repeats, warmup = (args.repeats1, args.warmup1) if batch == 1 else (args.repeats32, args.warmup32)
            t0 = time.perf_counter()
            timing[batch] = compare_latency(nets, RES, batch=batch, repeats=repeats, warmup=warmup)
            say(f"{arch}: batch {batch} timed, {repeats} rounds + {warmup} warm-up ({time.perf_counter() - t0:.0f} s, "
                f"load average now {os.getloadavg()[0]:.2f})")
            report.setdefault("load_average", []).append({"model": arch, "batch": batch, "after": os.getloadavg()})
        profiles = {b: breakdown(nets, b) for b in breakdown_batches}
        for name in nets:
            row = {"model": arch, "name": name, **meta[name], "ideal_speedup": 1 / meta[name]["flops_ratio"],
                   "timing": {}}
            for batch, t in timing.items():
                dense_ms = t["dense"]["median_ms"]
                row["timing"][str(batch)] = {**t[name], "speedup": dense_ms / t[name]["median_ms"],
                                             "gmacs_per_s": meta[name]["macs"] * batch / t[name]["median_ms"] / 1e6}
            if profiles:
                row["breakdown"] = {str(b): p[name] for b, p in profiles.items()}
            report["rows"].append(row)
        del nets
        report["wall_seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=2))   # after every model: a partial run keeps what it measured
    m = report["machine"]
    print(f"CPU latency, {RES}px, {CLASSES} classes, {m['cpu']}, {m['cores']} cores, {m['threads']} threads, "
          f"torch {m['torch']}; median of {args.repeats1} (batch 1) / {args.repeats32} (batch > 1) interleaved "
          f"rounds; speedup = dense ms / pruned ms; ideal = 1 / FLOPs ratio")
    print(table(report["rows"], args.batches))
    if breakdown_batches:
        print()
        print(breakdown_table(report["rows"]))
    print(f"wrote {out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()

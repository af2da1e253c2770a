#!/usr/bin/env python
"""CPU latency of a dense network and pruned networks from finished runs, measured side by side.

    python benchmarks/pruned_latency.py --dense runs/<dense run>/dense/result \
        --pruned pass=runs/<run>/finetune/result l1=runs/<run-l1>/finetune/result --batch 32 --repeats 30

Every network runs once per round, in turns (so load from other processes hits
all alike), and the median over rounds is reported. The backbones are timed
without the prompt (it adds the same few element-wise operations to every
network). Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.latency import compare_latency  # noqa: E402
from trainer.models import count_macs  # noqa: E402
from trainer.stages.product import load_product  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True, help="result directory holding the dense model.pt")
    parser.add_argument("--pruned", nargs="+", required=True, metavar="NAME=DIR",
                        help="finetune result directories of pruned runs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (default: all cores; importing FFCV would otherwise leave 1)")
    parser.add_argument("--out", default="benchmarks/results/pruned_latency.json")
    args = parser.parse_args()
    dense, blob = load_product(Path(args.dense))
    torch.set_num_threads(args.threads)  # after the imports: FFCV's import sets torch to 1 thread
    res = blob["res"]
    models = {"dense": dense.backbone}
    for item in args.pruned:
        name, _, directory = item.partition("=")
        model, other = load_product(Path(directory))
        if other["res"] != res or other["arch"] != blob["arch"]:
            sys.exit(f"error: {directory} is {other['arch']} at {other['res']}px, the dense network "
                     f"{blob['arch']} at {res}px")
        models[name] = model.backbone
    timing = compare_latency(models, res, batch=args.batch, repeats=args.repeats, warmup=args.warmup)
    macs = {name: count_macs(m, res) for name, m in models.items()}
    rows = []
    for name in models:
        rows.append({"network": name, "macs": macs[name], "flops_ratio": macs[name] / macs["dense"],
                     "median_ms": timing[name]["median_ms"],
                     "speedup": timing["dense"]["median_ms"] / timing[name]["median_ms"],
                     "ideal_speedup": macs["dense"] / macs[name]})
    print(f"{blob['arch']} at {res}px, CPU, batch {args.batch}, median of {args.repeats} interleaved runs, "
          f"{torch.get_num_threads()} threads")
    print(f"{'network':<16}{'MACs (M)':>10}{'FLOPs ratio':>13}{'latency ms':>12}{'speedup':>9}{'ideal':>7}")
    for r in rows:
        print(f"{r['network']:<16}{r['macs'] / 1e6:>10.1f}{r['flops_ratio']:>13.3f}{r['median_ms']:>12.2f}"
              f"{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
              "processor": platform.processor(), "threads": torch.get_num_threads(), "batch": args.batch,
              "repeats": args.repeats, "arch": blob["arch"], "res": res, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

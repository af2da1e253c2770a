#!/usr/bin/env python
"""Per-GPU memory of model states under DDP and DeepSpeed ZeRO-1/2/3, computed (and optionally measured).

    python benchmarks/zero_memory.py [--gpus 1,8,64] [--out benchmarks/results/zero_memory.json] [--measure]

For ResNet-50, VGG-16 (vgg16_bn) and ViT-B/16 at 224 px and 1000 classes, and
for the three kinds of training the trainer does:

  dense    all weights trainable; SGD with momentum (1 state), ViT: AdamW (2);
           also the upper bound of finetune (a pruned network is smaller)
  pass     PASS search: backbone frozen; hypernetwork + prompt trainable, AdamW
  vpns     VPNs search: backbone frozen; one fp32 score per Conv/Linear weight
           + prompt trainable, Adam

Model states only (parameters, gradients, optimizer states and the copies
the engines keep of them); activations, the CUDA context and temporary
communication buffers are NOT included. Everything is fp32: the DeepSpeed
engine keeps fp32 parameters and runs the forward under bf16 autocast.

--measure (CPU, gloo, 2 processes) builds ResNet-50 under deepspeed.initialize
with ZeRO-1/2/3, runs one training step and adds up, per rank, the bytes the
engine actually holds, next to the computed figure for N = 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pruning.pass_network import PassSearchNetwork  # noqa: E402
from pruning.prompt import PadPrompt  # noqa: E402
from pruning.scores import scorable_weights  # noqa: E402
from trainer.config.schema import root_config  # noqa: E402
from trainer.models.factory import build_backbone  # noqa: E402

MODELS = ("resnet50", "vgg16_bn", "vit_b_16")
ENGINES = ("ddp", "zero1", "zero2", "zero3")
ENGINE_TITLES = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
RES, CLASSES = 224, 1000
FP32 = 4  # bytes per parameter, gradient, optimizer state and master-weight entry
GIB = 2 ** 30
STAGE_TITLES = {
    "dense": "dense / finetune: all weights trainable (SGD momentum; ViT: AdamW)",
    "pass": "PASS search: backbone frozen, hypernetwork + prompt trainable (AdamW)",
    "vpns": "VPNs search: backbone frozen, one score per Conv/Linear weight + prompt trainable (Adam)",
}
FOOTER = """\
Model states only, fp32 (4 bytes) each: parameters (frozen ones included), gradients,
optimizer states (SGD momentum: 1, Adam/AdamW: 2 per trainable parameter), and
  DDP:  the reducer's gradient buckets, a second copy of the gradients (N > 1; the trainer's
        DDP keeps gradient_as_bucket_view=False);
  ZeRO: the optimizer's fp32 master copy of its partition of the trainable parameters
        (DeepSpeed 0.19 clones it even when the model is already fp32);
  ZeRO-1 is counted with full gradients (they stay whole between micro-batches with
        grad_accum_steps > 1; at 1 DeepSpeed keeps only its partition, see --measure).
NOT included: activations (batch- and resolution-dependent; often the largest term), the CUDA
context and allocator cache, communication buffers (ZeRO-1/2 under torch_autocast allocate two
fp32 reduce buckets of reduce_bucket_size = 5e8 elements each by default: 3.7 GiB; see --measure),
ZeRO-3's gathered parameters during forward/backward, and VPNs' masks."""


# --------------------------------------------------------------------------- workloads


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def workloads() -> list[dict]:
    """Parameter counts of each (stage, model): trainable, frozen, optimizer states per trainable one."""
    cfg = root_config()
    rows = []
    for name in MODELS:
        backbone = build_backbone(name, CLASSES, RES)
        total = _numel(backbone.parameters())
        # Dense/finetune: every weight trains. The trainer's default dense optimizer is SGD; ViT is
        # trained with AdamW in practice (its 2 states make it the heavier case).
        opt, states = ("adamw", 2) if name.startswith("vit") else ("sgd_momentum", 1)
        rows.append(dict(stage="dense", model=name, trainable=total, frozen=0, optimizer=opt, states=states))

        # PASS: built for real, so the hypernetwork size is exactly what the search trains. The graph
        # build converts ViT attention in place but keeps the parameter count.
        prompt = PadPrompt(RES, cfg.prompt.pad, cfg.prompt.variant)
        net = PassSearchNetwork(backbone, res=RES, prompt=prompt, pass_cfg=cfg["pass"],
                                flops_ratio=cfg.pruning.flops_ratio, residual=cfg.pruning.residual)
        hyper, prompt_params = net.trainable_parameters()
        trainable = _numel(hyper) + _numel(prompt_params)
        rows.append(dict(stage="pass", model=name, trainable=trainable, frozen=total, optimizer="adamw", states=2,
                         hypernet=_numel(hyper), prompt=_numel(prompt_params)))

        # VPNs: one score per scored weight (same shape), counted rather than attached; the whole
        # prompt tensor trains (its frame mask only zeroes the gradient of the centre).
        v = cfg.vpns
        scores = sum(w.weight.numel() for w in scorable_weights(build_backbone(name, CLASSES, RES),
                                                                exclude_first=v.exclude_first,
                                                                exclude_classifier=v.exclude_classifier))
        prompt_n = 3 * RES * RES
        rows.append(dict(stage="vpns", model=name, trainable=scores + prompt_n, frozen=total, optimizer="adam",
                         states=2, scores=scores, prompt=prompt_n))
    return rows


# --------------------------------------------------------------------------- memory model


def model_states(w: dict, engine: str, n: int) -> dict[str, float]:
    """Bytes per GPU of each model-state component of workload `w` under `engine` on `n` GPUs."""
    t, f, k = w["trainable"], w["frozen"], w["states"]
    zero = engine != "ddp"
    stage = int(engine[-1]) if zero else 0
    return {
        # ZeRO-3 partitions every parameter of the module, frozen ones too.
        "params": FP32 * (t + f) / (n if stage == 3 else 1),
        "grads": FP32 * t / (n if stage >= 2 else 1),
        # DDP all-reduces through flat buckets as large as all gradients; on one GPU the trainer
        # uses the plain module (no DDP wrapper, no buckets).
        "ddp_buckets": FP32 * t if engine == "ddp" and n > 1 else 0.0,
        # DeepSpeed's ZeRO optimizers step an fp32 clone of their partition and copy it back.
        "master": FP32 * t / n if zero else 0.0,
        "optimizer": FP32 * k * t / (n if zero else 1),
    }


def table(rows: list[dict], gpus: list[int]) -> tuple[str, list[dict]]:
    """The printed table and the JSON records (one per stage, model, GPU count and engine)."""
    records, lines = [], []
    head = f"{'model':<10}{'trainable':>11}{'frozen':>9}  {'optimizer':<13}{'GPUs':>5}" + "".join(
        f"{ENGINE_TITLES[e]:>9}" for e in ENGINES)
    for stage in STAGE_TITLES:
        lines += ["", f"== {STAGE_TITLES[stage]}", head]
        for w in (r for r in rows if r["stage"] == stage):
            for i, n in enumerate(gpus):
                totals = []
                for e in ENGINES:
                    parts = model_states(w, e, n)
                    total = sum(parts.values())
                    totals.append(total)
                    records.append({**w, "engine": e, "gpus": n, "bytes": parts, "total_bytes": total,
                                    "total_gib": total / GIB})
                label = (f"{w['model']:<10}{w['trainable'] / 1e6:>10.2f}M{w['frozen'] / 1e6:>8.1f}M  "
                         f"{w['optimizer']:<13}") if i == 0 else " " * 45
                lines.append(f"{label}{n:>5}" + "".join(f"{x / GIB:>9.3f}" for x in totals))
    lines += ["", "GiB per GPU. " + FOOTER]
    return "\n".join(lines), records


# --------------------------------------------------------------------------- --measure


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:  # count each memory region once (views of flat buffers appear several times)
        key = (t.data_ptr(), t.numel() * t.element_size())
        if t.numel() and key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _measure_rank(rank: int, world: int, port: int, stage: int, out_dir: str) -> None:
    """One process of the measurement: ResNet-50, one SGD step under ZeRO-`stage`, bytes held."""
    warnings.filterwarnings("ignore")
    # Never the GPU: this is a CPU measurement even on a GPU machine.
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)  # ours, before DeepSpeed looks for one
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of the shared-memory comm op
    import logging

    import deepspeed
    import torchvision
    deepspeed.utils.logger.setLevel(logging.ERROR)

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # Small buckets: the default 5e8-element ZeRO-3 buckets ran a 2-process CPU run out of memory
    # (> 20 GB per process). Buckets are temporary buffers, not model states: only the buckets column
    # depends on this.
    bucket = 10_000_000
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "torch_autocast": {"enabled": True, "dtype": "torch.bfloat16"},  # as the trainer's engine
              "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket,
                                    "allgather_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket}}
    engine, zopt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x, y = torch.randn(1, 3, 64, 64), torch.tensor([rank])  # 64 px: small, yet >1 value per BatchNorm channel
    params = list(engine.module.parameters())
    buckets = []
    if stage < 3:  # ZeRO-1/2 reduce buckets exist only during backward: read them at the stem conv (last)
        engine.module.conv1.weight.register_hook(lambda g: buckets.append(_tensor_bytes(
            buf for ipg in zopt.ipg_buckets.values() for buf in ipg.buffer)))

    loss = torch.nn.functional.cross_entropy(engine(x), y)
    engine.backward(loss)
    # Gradients exist between backward and step: the reduced partition (and any .grad left whole).
    grads = [p.grad for p in params if p.grad is not None]
    if stage == 3:
        grads.append(zopt.grad_partitions_flat_buffer)
    else:
        grads += [g for group in zopt.averaged_gradients.values() if group is not None for g in group]
    grad_bytes = _tensor_bytes(grads)
    engine.step()

    if stage == 3:  # the partition (ds_tensor) plus any full copy still materialised (persistent params)
        held = [p.ds_tensor for p in params] + [p.data for p in params if p.data.numel()]
        masters = zopt.fp32_partitioned_groups_flat
    else:
        held = [p.data for p in params]
        masters = zopt.single_partition_of_fp32_groups
    param_storages = {t.untyped_storage().data_ptr() for t in held}
    # The fp32 master partition counts only where it is a copy, not the parameters' own storage.
    masters = [m for m in masters if m.untyped_storage().data_ptr() not in param_storages]
    states = [t for s in zopt.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    result = {"rank": rank, "stage": stage, "params": _tensor_bytes(held), "grads": grad_bytes,
              "master": _tensor_bytes(masters), "optimizer": _tensor_bytes(states),
              "full_params_materialised": sum(p.data.numel() for p in params) if stage == 3 else None,
              "reduce_buckets": buckets[0] if buckets else None, "reduce_bucket_size": bucket}
    Path(out_dir, f"zero{stage}-rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(dense_resnet: dict) -> tuple[str, list[dict]]:
    import torch.multiprocessing as mp
    world, records = 2, []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (1, 2, 3):  # one spawn per stage: every run starts from a clean process
            mp.spawn(_measure_rank, args=(world, _free_port(), stage, tmp), nprocs=world)
            for rank in range(world):
                records.append(json.loads(Path(tmp, f"zero{stage}-rank{rank}.json").read_text()))
    keys = ("params", "grads", "master", "optimizer")
    lines = ["", f"== measured on CPU, {world} processes (gloo, DeepSpeed {_ds_version()}): resnet50, SGD momentum, "
             "one step; MiB", f"{'engine':<18}" + "".join(f"{k:>11}" for k in keys) + f"{'total':>11}"
             + f"{'buckets':>10}"]
    for stage in (1, 2, 3):
        computed = model_states(dense_resnet, f"zero{stage}", world)
        computed.pop("ddp_buckets")  # always 0 under ZeRO
        lines.append(f"{'ZeRO-%d computed' % stage:<18}" + "".join(f"{computed[k] / 2**20:>11.1f}" for k in keys)
                     + f"{sum(computed.values()) / 2**20:>11.1f}")
        for r in (r for r in records if r["stage"] == stage):
            r["total"] = sum(r[k] for k in keys)
            b = f"{r['reduce_buckets'] / 2**20:>10.1f}" if r["reduce_buckets"] is not None else f"{'-':>10}"
            lines.append(f"{'  measured rank %d' % r['rank']:<18}" + "".join(f"{r[k] / 2**20:>11.1f}" for k in keys)
                         + f"{r['total'] / 2**20:>11.1f}" + b)
    lines += ["params: p under ZeRO-1/2; p.ds_tensor under ZeRO-3 plus the full copies it keeps of small",
              "  parameters (stage3_param_persistence_threshold, 1e5 elements by default).",
              "grads: after backward, before step (grad_accum_steps = 1). master: the optimizer's fp32",
              "  partition, where it is a separate copy. optimizer: its state tensors (momentum).",
              "buckets (not in total): ZeRO-1/2 reduce buckets alive during backward, here with",
              f"  reduce_bucket_size = {records[0]['reduce_bucket_size']:.0e} elements (DeepSpeed's default is 5e8)."]
    return "\n".join(lines), records


def _ds_version() -> str:
    try:
        from importlib.metadata import version
        return version("deepspeed")
    except Exception:
        return "?"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,8,64", help="comma-separated GPU counts (default 1,8,64)")
    parser.add_argument("--out", default="benchmarks/results/zero_memory.json", help="JSON report path")
    parser.add_argument("--measure", action="store_true",
                        help="also measure ResNet-50 under ZeRO-1/2/3 with 2 CPU processes (needs deepspeed; minutes)")
    args = parser.parse_args()
    gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    if not gpus or min(gpus) < 1:
        sys.exit("error: --gpus needs positive integers, e.g. 1,8,64")

    rows = workloads()
    text, records = table(rows, gpus)
    print(f"Per-GPU memory of model states (GiB), computed, {RES} px, {CLASSES} classes")
    print(text)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpus": gpus, "bytes_per_value": FP32,
              "activations_included": False, "workloads": rows, "rows": records}
    if args.measure:
        dense_resnet = next(r for r in rows if r["stage"] == "dense" and r["model"] == "resnet50")
        mtext, measured = measure(dense_resnet)
        print(mtext)
        report["measured_cpu_2_processes"] = {"deepspeed": _ds_version(), "model": "resnet50", "rows": measured}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

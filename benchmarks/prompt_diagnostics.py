#!/usr/bin/env python
"""Does the visual prompt move, does it get a gradient, and does it change PASS's decision? Read from
finished sweeps (docs/results.md, "Why the prompt does (not) help").

    python benchmarks/prompt_diagnostics.py <sweep dir> [<sweep dir> ...] [--batches 4] [--out diag.json]

For every finished point with a prompt:

  moved      how far the prompt went from its zero start, over its effective (frame) entries, in pixel
             units of [0, 1] images: RMS and max |p| after search and after finetune. Adam moves each entry
             by at most about lr per step, so `max/bound` compares max |p| after search with lr x steps of
             the search (the prompt's learning rate and the number of optimizer steps it got).
  gradient   on the finetuned network (its product) and `--batches` training batches (center crop, no
             augmentation): the RMS of the loss gradient per effective prompt entry next to the RMS per
             backbone weight. Under SGD (the finetune) an entry moves by lr x its gradient, so the ratio says
             how fast the prompt moves compared with the weights.

For sweeps with a two-valued `pass.use_prompt` axis it also compares PASS's decisions: the share of
kept channels two runs have in common (intersection over union over all groups), for the same seed
with and without the prompt, next to two seeds of the same setting (what chance alone changes).
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.common import argument_parser, machine_info, parse_args, write_report  # noqa: E402
from pruning.prompt import PadPrompt  # noqa: E402
from trainer.data import prepare_data, val_loader  # noqa: E402
from trainer.run_dir import SWEEP_FILE, RunDir  # noqa: E402
from trainer.stages.product import load_product  # noqa: E402


def _effective(program: torch.Tensor, size: int, pad: int, variant: str) -> torch.Tensor:
    mask = PadPrompt(size, pad, variant).frame_mask.expand_as(program).bool()
    return program[mask]


def _searched_prompt(run: RunDir) -> torch.Tensor | None:
    result = run.result("search")
    if (result / "search.pt").exists():  # PASS: the hypernetwork's state and the prompt
        return torch.load(result / "search.pt", map_location="cpu", weights_only=True)["prompt"]
    blob = torch.load(result / "model.pt", map_location="cpu", weights_only=True)
    return blob["prompt"]["program"] if "prompt" in blob else None


def _search_steps(run: RunDir) -> int:
    records = [json.loads(line) for line in (run.stage("search") / "metrics.jsonl").read_text().splitlines() if line]
    return max((r["step"] for r in records), default=0)


def _gradients(cfg, directory: Path, batches: int) -> dict:
    model, _ = load_product(directory)
    files = prepare_data(cfg.data, is_writer=True, log=lambda m: None)
    loader = val_loader(files.train, res=cfg.data.res, batch_size=cfg.data.batch_size, num_workers=1,
                        device=torch.device("cpu"), rank=0, world_size=1, crop_ratio=cfg.data.val_crop_ratio,
                        jit=cfg.data.jit)
    model.train()
    for images, labels, _ in itertools.islice(loader, batches):
        torch.nn.functional.cross_entropy(model(images), labels).div(batches).backward()
    p = model.input_transform
    prompt = _effective(p.program.grad, p.size, p.pad, p.variant)
    weights = torch.cat([w.grad.flatten() for w in model.backbone.parameters() if w.grad is not None and w.dim() > 1])
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    return {"prompt_grad_rms": rms(prompt), "weight_grad_rms": rms(weights),
            "prompt_to_weight": rms(prompt) / max(rms(weights), 1e-30)}


def _kept(run: RunDir) -> set[tuple[str, int]]:
    structure = json.loads((run.result("search") / "structure.json").read_text())
    return {(g["name"], i) for g in structure["groups"] for i in g["kept"]}


def _iou(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def diagnose(sweep: Path, batches: int) -> dict:
    listing = json.loads((sweep / SWEEP_FILE).read_text())
    rows, done = [], {}
    for point in listing["points"]:
        run = RunDir(sweep, point["run"])
        if not (run.is_done("search") and run.is_done("finetune")):
            continue
        done[point["run"]] = (point["overrides"], run)
        cfg = OmegaConf.load(sweep / point["run"] / "config.yaml")
        searched = _searched_prompt(run)
        if searched is None:
            continue
        blob = torch.load(run.result("finetune") / "model.pt", map_location="cpu", weights_only=True)
        p = blob["prompt"]
        after_search = _effective(searched, p["size"], p["pad"], p["variant"])
        after_finetune = _effective(p["program"], p["size"], p["pad"], p["variant"])
        method = cfg.method.name
        lr = cfg["pass"].prompt_lr if method == "pass" else cfg.search.lr
        steps = _search_steps(run)
        row = {"run": f"{sweep.name}/{point['run']}", "method": method, "effective": after_search.numel(),
               "search_rms": float(after_search.pow(2).mean().sqrt()), "search_max": float(after_search.abs().max()),
               "search_steps": steps, "prompt_lr": lr,
               "max_over_bound": float(after_search.abs().max()) / (lr * steps) if steps else math.nan,
               "finetune_rms": float(after_finetune.pow(2).mean().sqrt()),
               "finetune_change_rms": float((after_finetune - after_search).pow(2).mean().sqrt()),
               **_gradients(cfg, run.result("finetune"), batches)}
        rows.append(row)
    widths = _pass_decisions(done)
    return {"sweep": str(sweep), "prompts": rows, "decisions": widths}


def _pass_decisions(done: dict) -> dict | None:
    points = {name: o for name, (o, _) in done.items()}
    if not points or not all("pass.use_prompt" in o and "seed" in o for o in points.values()):
        return None
    kept = {name: _kept(run) for name, (_, run) in done.items()}
    rest = lambda o, *drop: tuple(sorted((k, v) for k, v in o.items() if k not in drop))  # noqa: E731
    with_without, between_seeds = [], []
    for a, b in itertools.combinations(points, 2):
        oa, ob = points[a], points[b]
        if rest(oa, "pass.use_prompt") == rest(ob, "pass.use_prompt") and oa["pass.use_prompt"] != ob["pass.use_prompt"]:
            with_without.append(_iou(kept[a], kept[b]))
        elif rest(oa, "seed") == rest(ob, "seed") and oa["seed"] != ob["seed"]:
            between_seeds.append(_iou(kept[a], kept[b]))
    return {"iou_with_vs_without_prompt": with_without, "iou_between_seeds": between_seeds}


def main() -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("sweeps", nargs="+", help="sweep directories (runs/<sweep>)")
    parser.add_argument("--batches", type=int, default=4, help="training batches the gradients are averaged over")
    args = parse_args(parser, "prompt_diagnostics")
    torch.manual_seed(0)
    results = [diagnose(Path(s).expanduser(), args.batches) for s in args.sweeps]
    print("| run | effective | steps x lr | search RMS | search max | max/bound | finetune change RMS | "
          "grad RMS prompt | grad RMS weights | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in (r for res in results for r in res["prompts"]):
        print(f"| {r['run']} | {r['effective']} | {r['search_steps']} x {r['prompt_lr']:g} | {r['search_rms']:.4f} | "
              f"{r['search_max']:.4f} | {r['max_over_bound']:.2f} | {r['finetune_change_rms']:.5f} | "
              f"{r['prompt_grad_rms']:.2e} | {r['weight_grad_rms']:.2e} | {r['prompt_to_weight']:.3f} |")
    for res in results:
        d = res["decisions"]
        if d and d["iou_with_vs_without_prompt"]:
            fmt = lambda v: f"{statistics.fmean(v):.3f} (min {min(v):.3f}, n={len(v)})" if v else "—"  # noqa: E731
            print(f"\n{res['sweep']}: kept channels in common (IoU), same seed with vs without prompt: "
                  f"{fmt(d['iou_with_vs_without_prompt'])}; two seeds, same setting: {fmt(d['iou_between_seeds'])}")
    write_report(args.out, {"machine": machine_info(), "sweeps": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

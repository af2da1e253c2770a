"""VPNs and the unstructured baselines through the real launcher: search, finetune, DDP, resume, export."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import (TINY, child_env, copy_dense, launch, launch_here, read_json, run_and_kill_at_step, run_here,
                      run_main, vpns_args)

pytestmark = pytest.mark.slow


def _checkpoints(stage_dir):
    return sorted((stage_dir / "checkpoints").glob("*.pt"))


def _model_state(path):
    return torch.load(path, weights_only=False)["engine"]["model"]


def _backbone(state):
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def _is_norm_statistic(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_no_prompt_ablation_changes_only_the_prompt(dense_run, tmp_path, beton_dir):
    """vpns.use_prompt=false keeps VPNs' global threshold and its two optimizer steps per batch (each on the
    plain batch). The prompt starts at zero, so after one batch with the same seed both searches hold the same
    scores, masks and norm statistics, bit for bit, and logged the same losses: only VPNs has (and moved) a
    prompt. Its finetune has no prompt either."""
    weights = dense_run / "r/dense/result/model.pt"

    def search(name, *extra):
        runs = tmp_path / name
        run_here(["method=vpns", "stage=search", "run=r", f"runs_dir={runs}", f"model.weights={weights}",
                  f"data.beton_dir={beton_dir}", *TINY, "data.synthetic_train_size=64", "search.epochs=1",
                  "search.lr=0.01", "pruning.density=0.1", "log.every_steps=1", *extra])
        return runs / "r/search"

    vpns, ablation = search("vpns"), search("ablation", "vpns.use_prompt=false")
    a, b = _model_state(vpns / "checkpoints/last.pt"), _model_state(ablation / "checkpoints/last.pt")
    assert a["input_transform.program"].abs().sum() > 0 and not any(k.startswith("input_transform") for k in b)
    assert {k for k in a if not k.startswith("input_transform")} == set(b)
    differ = [k for k in b if not torch.equal(a[k], b[k])]
    assert not differ, f"the ablation changed more than the prompt: {differ[:5]}"
    masks_a, masks_b = (torch.load(d / "result/masks.pt", weights_only=True) for d in (vpns, ablation))
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)

    sa, sb = read_json(vpns / "result/summary.json"), read_json(ablation / "result/summary.json")
    assert sa["threshold"] == sb["threshold"] == "global" and sa["density_achieved"] == sb["density_achieved"]
    assert sa["top1_prompt"] is not None and sb["top1_prompt"] is None
    [la], [lb] = ([json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in r]
                  for d in (vpns, ablation))
    assert (la["loss"], la["loss_no_prompt"]) == (lb["loss"], lb["loss_plain_again"])  # two steps each, same losses

    # vpns.prompt_lr: the prompt's own rate. Adam's first step moves every entry with a gradient by the rate
    # itself, and the scores' steps saw a zero prompt in both runs, so only the prompt's size differs.
    faster = search("faster", "vpns.prompt_lr=0.5")
    c = _model_state(faster / "checkpoints/last.pt")
    for state, rate in ((a, 0.01), (c, 0.5)):
        assert state["input_transform.program"].abs().max().item() == pytest.approx(rate, rel=1e-3)
    assert all(torch.equal(a[k], c[k]) for k in b), "the prompt's rate changed more than the prompt"

    from trainer.config import load_config
    from pruning.methods import get_method
    assert get_method("vpns").finetune_prompt(load_config(["method=vpns"]))
    assert not get_method("vpns").finetune_prompt(load_config(["method=vpns", "vpns.use_prompt=false"]))


def test_search_trains_only_scores_and_prompt(vpns_run):
    """Every weight and norm affine parameter is bitwise the dense one; the scores and prompt moved."""
    runs = vpns_run.runs
    dense = torch.load(runs / "r/dense/result/model.pt", weights_only=True)["model"]
    state = _model_state(runs / "r/search/checkpoints/last.pt")
    backbone = _backbone(state)
    scores = {k: v for k, v in backbone.items() if k.endswith("_score")}
    assert {k[:-len("_score")] for k in scores} == {k for k in dense if k.endswith("weight") and dense[k].dim() > 1}
    changed = [k for k in dense if not _is_norm_statistic(k) and not torch.equal(dense[k], backbone[k])]
    assert not changed, f"search changed weights: {changed[:5]}"
    assert state["input_transform.program"].abs().sum() > 0, "the prompt did not train"

    from pruning.scores import initial_scores, keep_top
    start = keep_top([initial_scores(dense[k[:-len("_score")]]).abs() for k in scores], 0.1)
    end = keep_top([v.abs() for v in scores.values()], 0.1)
    moved = sum(int((a != b).sum()) for a, b in zip(start, end))
    assert moved > 0, "the scores never changed the mask"

    summary = read_json(runs / "r/search/result/summary.json")
    assert summary["weights_kept"] == summary["weights_scored"] - int(0.9 * summary["weights_scored"])
    assert abs(summary["density_achieved"] - 0.1) * summary["weights_scored"] <= len(scores)
    # The published masked network: kept weights are the dense ones, masked ones are zero.
    product = torch.load(runs / "r/search/result/model.pt", weights_only=True)["model"]
    masks = torch.load(runs / "r/search/result/masks.pt", weights_only=True)
    for key, mask in masks.items():
        assert torch.equal(product[key][mask], dense[key][mask]) and not product[key][~mask].any(), key


def test_finetune_keeps_the_mask_fixed_and_exports_plain_weights(vpns_run):
    """Masked weights are exactly zero in every finetune checkpoint and in the export; kept ones train.
    (vpns_run: finetune.epochs=2, checkpoint.every_steps=4, checkpoint.keep=20.)"""
    runs = vpns_run.runs
    masks = torch.load(runs / "r/search/result/masks.pt", weights_only=True)
    searched = torch.load(runs / "r/search/result/model.pt", weights_only=True)["model"]
    checkpoints = _checkpoints(runs / "r/finetune")
    assert len(checkpoints) >= 3, checkpoints
    for path in checkpoints:
        backbone = _backbone(_model_state(path))
        for key, mask in masks.items():
            assert not backbone[key][~mask].any(), f"{path.name}: masked entries of {key} are not zero"
    export = torch.load(runs / "r/finetune/result/torchvision_state_dict.pt", weights_only=True)
    for key, mask in masks.items():
        assert not export[key][~mask].any(), key
    assert any(not torch.equal(export[k][m], searched[k][m]) for k, m in masks.items()), "kept weights never trained"
    fin = read_json(runs / "r/finetune/result/summary.json")
    assert fin["masked_weights_nonzero"] == 0 and fin["dual_step"] is True
    for key in ("density_target", "density_achieved", "density_per_layer", "top1_no_prompt", "top1_prompt"):
        assert key in fin, key
    assert fin["density_target"] == 0.1 and abs(fin["density_achieved"] - 0.1) < 1e-6
    assert set(fin["density_per_layer"]) == set(masks)
    # the dual step logs the unprompted step's loss next to the prompted one
    epochs = [json.loads(l) for l in (runs / "r/finetune/metrics.jsonl").read_text().splitlines()]
    assert all("train_loss_no_prompt" in r for r in epochs if r["kind"] == "epoch")


def test_two_process_search_keeps_identical_masks_on_both_ranks(dense_run, tmp_path, beton_dir):
    runs = copy_dense(dense_run, tmp_path)
    out = launch(vpns_args(runs, beton_dir, "stage=search"), torchrun=2, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = read_json(runs / "r/search/result/summary.json")
    digests = summary["mask_digest_per_rank"]
    assert summary["world_size"] == 2 and len(digests) == 2
    assert digests[0] == digests[1], digests


def test_search_resumes_after_sigkill_with_the_same_masks(dense_run, vpns_run, tmp_path, beton_dir):
    """Killed inside epoch 2 and relaunched, the search ends with vpns_run's masks (the same search settings)."""
    extra = ["stage=search", "checkpoint.every_steps=3", "log.every_steps=1"]
    whole = vpns_run.runs
    runs = copy_dense(dense_run, tmp_path / "b")
    run_and_kill_at_step(vpns_args(runs, beton_dir, *extra), runs / "r" / "search" / "metrics.jsonl", 13)
    resumed = launch_here(vpns_args(runs, beton_dir, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert any("resumed from" in l and "epoch 2" in l for l in resumed.stdout.splitlines()), resumed.stdout
    a = torch.load(whole / "r/search/result/masks.pt", weights_only=True)
    b = torch.load(runs / "r/search/result/masks.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = read_json(whole / "r/search/result/summary.json"), read_json(runs / "r/search/result/summary.json")
    assert sa["top1"] == sb["top1"]


@pytest.mark.parametrize("method", ["omp", "hydra", "random_unstructured"])
def test_unstructured_baselines_meet_the_density_and_finetune(dense_run, unstructured_sweep, method):
    """One local sweep (conftest.unstructured_sweep) runs the three baselines at density 0.3."""
    run = unstructured_sweep.runs / "sw" / f"method-{method}"
    search = read_json(run / "search/result/summary.json")
    fin = read_json(run / "finetune/result/summary.json")
    assert (run / "eval/result/summary.json").exists()
    layers = len(fin["density_per_layer"])
    assert abs(fin["density_achieved"] - 0.3) * fin["weights_scored"] <= layers
    assert search["epochs"] == (2 if method == "hydra" else 0)
    if method == "hydra":  # per-layer threshold, no prompt in the search
        assert search["threshold"] == "layer" and search["top1_prompt"] is None
        assert all(abs(d - 0.3) < 0.01 for d in fin["density_per_layer"].values())
    if method == "omp":  # global magnitude: the kept weights are the largest of the dense network
        dense = torch.load(dense_run / "r/dense/result/model.pt", weights_only=True)["model"]
        masks = torch.load(run / "search/result/masks.pt", weights_only=True)
        smallest_kept = min(dense[k][m].abs().min() for k, m in masks.items())
        largest_dropped = max(dense[k][~m].abs().max() for k, m in masks.items())
        assert smallest_kept >= largest_dropped


def test_export_loads_into_plain_torchvision_in_a_fresh_process(vpns_run):
    """The exported state dict in `torchvision.models.resnet18`, evaluated by FFCV + torch only, matches eval."""
    runs = vpns_run.runs
    ev = read_json(runs / "r/eval/result/summary.json")

    from omegaconf import OmegaConf

    from trainer.data import prepare_data
    cfg = OmegaConf.load(runs / "r/config.yaml")
    val = prepare_data(cfg.data, is_writer=False, log=lambda m: None).val
    result = runs / "r/finetune/result"
    code = f"""
import json, sys, torch, torchvision
from ffcv.loader import Loader, OrderOption
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
from ffcv.transforms import ToTensor, ToTorchImage, Squeeze
assert not any(m.split('.')[0] in ('trainer', 'pruning', 'slurm') for m in sys.modules)
state = torch.load({str(result / 'torchvision_state_dict.pt')!r}, weights_only=True)
net = torchvision.models.resnet18(num_classes=state['fc.weight'].shape[0])
net.load_state_dict(state)           # strict: no missing or unexpected keys
net.eval()
product = torch.load({str(result / 'model.pt')!r}, weights_only=True)
p = product['prompt']
frame = torch.ones(1, p['size'], p['size'])
frame[:, p['pad']:p['size'] - p['pad'], p['pad']:p['size'] - p['pad']] = 0
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1); std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
loader = Loader({str(val)!r}, batch_size=50, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines={{
    'image': [CenterCropRGBImageDecoder(({cfg.data.res}, {cfg.data.res}), ratio={cfg.data.val_crop_ratio}),
              ToTensor(), ToTorchImage()],
    'label': [IntDecoder(), ToTensor(), Squeeze(1)], 'index': None}})
correct = {{'plain': 0, 'prompt': 0}}; total = 0
with torch.no_grad():
    for images, labels in loader:
        x = images.float() / 255
        correct['plain'] += int((net((x - mean) / std).argmax(1) == labels).sum())
        prompted = torch.clamp(x + p['program'] * frame, 0, 1)
        correct['prompt'] += int((net((prompted - mean) / std).argmax(1) == labels).sum())
        total += len(labels)
print(json.dumps({{k: 100 * v / total for k, v in correct.items()}} | {{'total': total}}))
"""
    assert cfg.prompt.variant == "pad"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    report = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert report["total"] == ev["num_images"]
    assert report["plain"] == pytest.approx(ev["top1_no_prompt"], abs=1e-9), (report, ev)
    assert report["prompt"] == pytest.approx(ev["top1_prompt"], abs=1e-9), (report, ev)


def test_label_mapping_reuses_a_larger_classifier(dense_run, tmp_path, beton_dir):
    """head=map on a 20-output checkpoint: the product is a 10-way network whose rows are the mapped outputs."""
    dense = torch.load(dense_run / "r/dense/result/model.pt", weights_only=True)["model"]
    wide = dict(dense)
    torch.manual_seed(0)
    extra = torch.randn(10, wide["fc.weight"].shape[1]) * 0.01
    perm = torch.randperm(20)
    weight = torch.zeros(20, wide["fc.weight"].shape[1])
    bias = torch.full((20,), -10.0)   # unused outputs are never predicted
    weight[perm[:10]] = dense["fc.weight"]
    bias[perm[:10]] = dense["fc.bias"]
    weight[perm[10:]] = extra
    wide["fc.weight"], wide["fc.bias"] = weight, bias
    path = tmp_path / "wide.pt"
    torch.save(wide, path)
    out = launch_here(vpns_args(tmp_path / "runs", beton_dir, "stage=search", f"model.weights={path}", "head=map",
                           "search.epochs=0"))
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_json(tmp_path / "runs/r/search/result/summary.json")
    assert summary["head"] == "map" and summary["source_outputs"] == 20
    mapping = summary["label_mapping"]
    assert len(set(mapping)) == 10 and all(0 <= o < 20 for o in mapping)
    # The dense network's own outputs sit at perm[:10]; the others are never predicted (bias -10).
    # How many classes land on their own output depends on how well the small dense network predicts;
    # exact recovery on a constructed case is tests/test_scores.py::test_label_mapping_recovers_known_permutation.
    assert len(set(mapping) & set(perm[:10].tolist())) >= 8, (mapping, perm[:10].tolist())
    product = torch.load(tmp_path / "runs/r/search/result/model.pt", weights_only=True)["model"]
    masks = torch.load(tmp_path / "runs/r/search/result/masks.pt", weights_only=True)
    assert torch.equal(product["fc.weight"], weight[mapping] * masks["fc.weight"])  # the product is masked
    assert torch.equal(product["fc.bias"], bias[mapping])
    # A mismatched head with head=keep is a one-line error.
    code, _, err = run_main(vpns_args(tmp_path / "runs2", beton_dir, "stage=search", f"model.weights={path}",
                                      "head=keep"))
    assert code == 2 and "head=keep" in err and "Traceback" not in err, err[-1500:]

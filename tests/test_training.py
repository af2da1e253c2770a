"""Real training runs through the launcher: resume after SIGKILL, DDP vs one process, stage=all, eval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, launch, read_json, run_and_kill_at_step, write_image_folder

pytestmark = pytest.mark.slow


def _dense_args(runs, beton_dir, *extra):
    return ["stage=dense", "run=r", f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *TINY, *extra]


def _weights(runs):
    return torch.load(runs / "r" / "dense" / "result" / "model.pt", weights_only=True)["model"]


def _epochs(runs):
    lines = (Path(runs) / "r" / "dense" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, beton_dir):
    extra = ["dense.epochs=3", "checkpoint.every_steps=3", "log.every_steps=1"]
    whole = launch(_dense_args(tmp_path / "a", beton_dir, *extra))
    assert whole.returncode == 0, whole.stderr[-2000:]

    runs = tmp_path / "b"
    # kill inside epoch 2 (10 steps per epoch)
    run_and_kill_at_step(_dense_args(runs, beton_dir, *extra), runs / "r" / "dense" / "metrics.jsonl", 13)
    assert not (runs / "r" / "dense" / "result").exists()

    resumed = launch(_dense_args(runs, beton_dir, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    line = next(l for l in resumed.stdout.splitlines() if "resumed from" in l)
    batch = int(line.split("batch ")[1].split()[0])
    assert "epoch 2" in line and 0 < batch < 10, line  # mid-epoch

    a, b = read_json(tmp_path / "a/r/dense/result/summary.json"), read_json(runs / "r/dense/result/summary.json")
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    assert [(e["train_loss"], e["val_top1"]) for e in _epochs(tmp_path / "a")] == \
           [(e["train_loss"], e["val_top1"]) for e in _epochs(runs)]
    wa, wb = _weights(tmp_path / "a"), _weights(runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise identical final weights


# Two processes (torchrun, gloo) vs one, same global batch (64) and seed. Both see the same global
# batches in the same order (tests/test_data.py checks that). With augmentation off the inputs are
# identical too; what remains is that BatchNorm normalises over the 32 images of each process instead
# of all 64 (SyncBatchNorm has no CPU kernel) and float summation order. Tolerance: 5 points of top-1
# (seen: 56.36% vs 58.96% on these 385 validation images) and 10% of the final train loss (seen: 3%). With augmentation on, the random crops differ as
# well and training at lr 0.1 is chaotic: we saw 49.5% vs 46.75%, too noisy for a test.
DDP_TOLERANCE = 5.0


def test_two_process_ddp_matches_single_process(tmp_path, beton_dir):
    extra = ["dense.epochs=4", "dense.lr=0.02", "data.synthetic_train_size=1280", "data.synthetic_val_size=385",
             "data.augment=false"]  # 385 = 193 + 192 images: the ranks evaluate 7 and 6 batches
    one = launch(_dense_args(tmp_path / "one", beton_dir, *extra))
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(_dense_args(tmp_path / "two", beton_dir, *extra), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = read_json(tmp_path / "one/r/dense/result/summary.json"), read_json(tmp_path / "two/r/dense/result/summary.json")
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s1["num_val"] == 385 and s1["top1"] > 30 and s2["top1"] > 30, (s1["top1"], s2["top1"])
    losses = [[e["train_loss"] for e in _epochs(tmp_path / d)] for d in ("one", "two")]
    print(f"top-1 one process {s1['top1']:.2f}%, two processes {s2['top1']:.2f}%; train losses {losses}")
    assert abs(s1["top1"] - s2["top1"]) <= DDP_TOLERANCE, (s1["top1"], s2["top1"])
    assert abs(losses[0][-1] - losses[1][-1]) <= 0.1 * losses[0][-1], losses


def test_stage_all_then_eval_on_another_val_dir(tmp_path, beton_dir):
    runs = tmp_path / "runs"
    args = ["stage=all", "method=dense", "run=r", f"runs_dir={runs}", f"data.beton_dir={beton_dir}", *TINY,
            "dense.epochs=1"]
    first = launch(args)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = read_json(runs / "r/dense/result/summary.json")
    for key in ("stage", "method", "model", "top1", "top5", "epochs", "images_per_second", "wall_seconds",
                "params", "flops"):
        assert key in summary, key
    assert summary["flops"] == 37016576 // 1 and summary["params"] == 11181642  # resnet18, 10 classes, 32 px
    assert (runs / "r/eval/summary.json").exists() and (runs / "r/config.yaml").exists()

    again = launch(args)  # a finished run is a no-op that says so
    assert again.returncode == 0 and "is finished (dense, eval done); nothing to do" in again.stdout, again.stdout

    # Evaluate on an ImageFolder tree whose folders are the synthetic class names.
    from trainer.data.synthetic import SyntheticImages
    classes = SyntheticImages(10, 32, 10, 0).classes
    tree = write_image_folder(tmp_path / "tree", per_class=3, num_classes=10, seed=5)
    for i, name in enumerate(classes):
        (tree / f"class_{i}").rename(tree / name)
    ev = launch(["stage=eval", "run=r", f"runs_dir={runs}", f"data.val_dir={tree}", f"data.beton_dir={beton_dir}"])
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = read_json(runs / "r/eval/summary.json")
    assert result["num_images"] == 30 and result["val_source"] == str(tree) and result["product"] == "dense"


def test_a_stage_the_method_lacks_says_so_in_one_line(tmp_path, beton_dir):
    proc = launch(["stage=search", "method=dense", f"runs_dir={tmp_path}", f"data.beton_dir={beton_dir}", *TINY])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: method=dense has no search stage"]
    proc = launch(["stage=search", "method=vpns", f"runs_dir={tmp_path}", f"data.beton_dir={beton_dir}", *TINY])
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "needs a trained dense network" in errors[0], proc.stderr[-1500:]

"""Reports: a stage=all sweep trains one shared dense network, prunes it per point and ends with report.md
and its plots; stage=report rebuilds them; TensorBoard logging sits next to metrics.jsonl."""
from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

from conftest import TINY, build_once, launch, launch_here, read_json, run_here, run_main

pytestmark = pytest.mark.slow

POINTS = ["method-pass_flops_ratio-0.3", "method-pass_flops_ratio-0.6",
          "method-l1_flops_ratio-0.3", "method-l1_flops_ratio-0.6"]
SHORT = ["dense.epochs=1", "search.epochs=1", "search.lr=0.01", "pass.prompt_lr=0.01", "finetune.epochs=1",
         "log.every_steps=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, beton_dir):
    """A 2x2 stage=all sweep (two methods, two FLOPs ratios), logged to TensorBoard too; in-process, once
    for the session (conftest.build_once: whichever worker asks first)."""
    def args(runs):
        return ["-m", "method=pass,l1", "pruning.flops_ratio=0.3,0.6", "run=sw", f"runs_dir={runs}",
                f"data.beton_dir={beton_dir}", "logger=tensorboard", *TINY, *SHORT]
    folder, stdout = build_once(tmp_path_factory, "report", lambda folder: run_here(args(folder / "runs")))
    return folder / "runs" / "sw", args(folder / "runs"), stdout


def _table_rows(report: str) -> list[list[str]]:
    lines = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| run |")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_sweep_points_prune_one_shared_dense_network(sweep):
    root, args, stdout = sweep
    assert "pruning 1 shared dense run(s): dense" in stdout and stdout.count("dense epoch 1/1") == 1, stdout[-3000:]
    assert read_json(root / "sweep.json")["shared"] == [{"run": "dense", "stage": "dense"}]
    dense_product = root / "dense/dense/result/model.pt"
    dense_top1 = read_json(root / "dense/dense/result/summary.json")["top1"]
    for point in POINTS:
        assert not (root / point / "dense").exists(), f"{point} trained a dense network of its own"
        search = read_json(root / point / "search/result/summary.json")
        assert search["dense_source"] == str(dense_product)
        assert read_json(root / point / "finetune/result/summary.json")["top1_dense"] == dense_top1
    status = launch_here(["stage=status", "run=sw", f"runs_dir={root.parent}"])
    assert "sharing 1 dense run(s)" in status.stdout and "5 done" in status.stdout, status.stdout + status.stderr
    code, again, err = run_main(args)
    assert code == 0 and again.count("nothing to do") == 5, again[-2000:] + err


def test_sweep_ends_with_a_report_of_every_run_and_readable_plots(sweep):
    root, _, stdout = sweep
    assert f"report: {root}/report/report.md" in stdout
    report = (root / "report/report.md").read_text()
    rows = {row[0]: row for row in _table_rows(report)}
    assert set(rows) == {"dense", *POINTS}, report
    dense = read_json(root / "dense/dense/result/summary.json")
    assert rows["dense"][1] == "dense" and rows["dense"][8] == f"{dense['top1']:.2f}"
    for point in POINTS:
        method, ratio = re.match(r"method-(\w+)_flops_ratio-([\d.]+)", point).groups()
        final = read_json(root / point / "finetune/result/summary.json")
        evaluated = read_json(root / point / "eval/result/summary.json")
        row = rows[point]
        assert row[1] == method and row[4] == f"FLOPs {ratio}"
        assert row[5] == f"FLOPs {final['flops_ratio_achieved']:.3f}"
        assert row[6] == f"{final['params'] / 1e6:.2f}"
        assert row[7] == f"{evaluated['top1_prompt']:.2f}" and row[8] == f"{evaluated['top1_no_prompt']:.2f}"
        assert row[9] == f"{evaluated['top5']:.2f}"
        assert row[11] == f"{final['latency']['speedup']:.2f}x"
        wall = read_json(root / point / "search/result/summary.json")["wall_seconds"] + final["wall_seconds"]
        assert row[12] == f"{wall / 60:.1f}"
    # Structured methods only: no density plots.
    plots = sorted(p.name for p in (root / "report").glob("*.png"))
    assert plots == ["accuracy_vs_flops.png", "kept_width.png", "training_curves.png"], plots
    for name in plots:
        assert f"]({name})" in report
        with Image.open(root / "report" / name) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 400
    # Each point also has its own report, whose dense baseline is the shared run.
    own = _table_rows((root / POINTS[0] / "report/report.md").read_text())
    assert [row[0] for row in own] == ["dense", POINTS[0]]


def test_report_stage_rebuilds_it_and_names_an_unreadable_file(sweep, tmp_path):
    root, _, _ = sweep
    copy = tmp_path / "runs" / "sw"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "report")
    out = launch(["stage=report", "run=sw", f"runs_dir={copy.parent}"])  # the real command line
    assert out.returncode == 0 and "5 run(s)" in out.stdout, out.stdout + out.stderr
    assert (copy / "report/report.md").exists() and (copy / "report/accuracy_vs_flops.png").exists()
    broken = copy / POINTS[1] / "finetune/result/summary.json"
    broken.write_text('{"stage": "fine')
    code, _, err = run_main(["stage=report", "run=sw", f"runs_dir={copy.parent}"])
    assert code == 2 and err.startswith(f"error: cannot read {broken}: "), err
    assert len(err.strip().splitlines()) == 1, err
    code, _, err = run_main(["stage=report", "run=nope", f"runs_dir={copy.parent}"])
    assert code == 2 and "no run or sweep 'nope'" in err, err


def test_tensorboard_logs_the_same_scalars_as_metrics_jsonl(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = sweep
    for stage_dir in (root / "dense/dense", root / POINTS[0] / "search", root / POINTS[0] / "finetune"):
        records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        events = EventAccumulator(str(stage_dir / "tensorboard"))
        events.Reload()
        epochs = [r for r in records if r["kind"] == "epoch"]
        logged = events.Scalars("epoch/val_top1")
        assert [e.step for e in logged] == [r["step"] for r in epochs]
        assert [round(e.value, 4) for e in logged] == [round(r["val_top1"], 4) for r in epochs]
        train = [r for r in records if r["kind"] == "train"]
        assert len(events.Scalars("train/loss")) == len(train) > 0


def _seed_sweep(root, points):
    """A sweep directory with finished points and made-up figures (the statistics, not training, are tested)."""
    root.mkdir(parents=True)
    listing = []
    for overrides, search_top1, finetune_top1 in points:
        name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in overrides.items())
        listing.append({"run": name, "overrides": overrides})
        (root / name).mkdir()
        (root / name / "config.yaml").write_text("method:\n  name: pass\n")
        prompt = overrides["pass.use_prompt"] == "true"
        for stage, top1 in (("search", search_top1), ("finetune", finetune_top1)):
            (root / name / stage / "result").mkdir(parents=True)
            (root / name / stage / "result" / "summary.json").write_text(json.dumps({
                "top1": top1, "top1_prompt": top1 if prompt else None, "top1_no_prompt": top1 - 1.0,
                "flops_ratio_achieved": 0.5}))
    (root / "sweep.json").write_text(json.dumps({"points": listing}))
    return root


def test_seed_sweeps_get_mean_std_and_paired_intervals(tmp_path):
    from trainer.report.seeds import _selected, main, paired_between, paired_differences, seed_runs, seeds_markdown
    finetune = {("true", "0"): 60.0, ("true", "1"): 62.0, ("true", "2"): 61.0,
                ("false", "0"): 59.0, ("false", "1"): 60.0, ("false", "2"): 61.0}
    sweep = _seed_sweep(tmp_path / "sw", [({"pass.use_prompt": p, "seed": s}, 50.0 + int(s), top1)
                                          for (p, s), top1 in finetune.items()])
    runs = seed_runs(sweep)
    assert len(runs) == 6
    table = "\n".join(seeds_markdown([sweep]))
    assert "| pass use_prompt=true | 0,1,2 | 51.00 ± 1.00 | 50.00 ± 1.00 | 61.00 ± 1.00 | 60.00 ± 1.00 | FLOPs 0.500 |" \
        in table, table
    assert "| pass use_prompt=false | 0,1,2 | — | 50.00 ± 1.00 | — | 59.00 ± 1.00 | FLOPs 0.500 |" in table, table
    pairs = {p.metric: p for p in paired_differences(runs)}
    assert pairs["before finetune"].differences == [0.0, 0.0, 0.0]
    after = pairs["after finetune"]
    assert sorted(after.differences) == [0.0, 1.0, 2.0]
    mean, low, high = after.interval  # 1 ± t(2) * 1 / sqrt(3)
    assert mean == 1.0 and high - mean == pytest.approx(4.303 / 3 ** 0.5, abs=1e-3) and low < 0 < high
    assert "| use_prompt=true − false | pass | after finetune | 3 | +1.00 | [-1.48, +3.48] |" in table, table
    # The command line over several sweeps; a sweep without seeds contributes nothing.
    assert main([str(sweep)]) == 0 and main([]) == 2 and main(["--pair", str(sweep)]) == 2
    # --pair: two (selections of) sweeps, paired on the seed and the settings they share: the same figures
    first, _, keys = _selected(f"{sweep}:pass.use_prompt=true")
    second, _, _ = _selected(f"{sweep}:pass.use_prompt=false")
    assert not paired_between(first, second, ("a", "b"))  # the settings differ in pass.use_prompt ...
    across = {p.metric: p for p in paired_between(first, second, ("a", "b"), frozenset(keys))}  # ... chosen
    assert across["after finetune"].differences == after.differences and across["after finetune"].rest == (
        ("method", "pass"),)

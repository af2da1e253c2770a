"""Recipes (configs/experiment/): every preset composes and validates at every point, the command line
wins over a recipe, and each recipe trains one step of search and finetune on tiny data."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import TINY, read_json, run_here, write_image_folder
from slurm.sweep import expand
from trainer.config import ConfigError, group_options, load_config, validate_config
from trainer.config.experiment import expand_experiment, load_experiment

EXPERIMENTS = group_options("experiment")


def test_there_are_recipes():
    assert "vpns_paper" in EXPERIMENTS


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("tree") / "train", per_class=2)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_point_of_every_recipe_composes_and_validates(name, tiny_tree, tmp_path):
    exp = load_experiment(name)
    assert exp.description and exp.overrides
    tokens, sweep = expand_experiment([f"experiment={name}", f"data.train_dir={tiny_tree}", f"runs_dir={tmp_path}"],
                                      sweep=False)
    points = 1
    for values in exp.sweep.values():
        points *= len(values)
    assert sweep == (points > 1)
    if not sweep:  # a single run
        validate_config(load_config(tokens))
        return
    root, base, configs, listing, _ = expand(tokens)  # composes and validates each point
    assert root.name == name and len(configs) == points
    for cfg, point in zip(configs, listing):
        for key, value in point["overrides"].items():
            found = OmegaConf.select(cfg, key)
            assert (str(found).lower() if isinstance(found, bool) else str(found)) == value


def test_the_command_line_wins_over_the_recipe():
    recipe, sweep = expand_experiment(["experiment=vpns_paper"], sweep=False)
    assert sweep and "pruning.density=0.6,0.5,0.4,0.3,0.2,0.1" in recipe and "seed=7,9,17" in recipe
    assert recipe[-1] == "run=vpns_paper"
    point, sweep = expand_experiment(["experiment=vpns_paper", "seed=7", "pruning.density=0.1"], sweep=False)
    assert not sweep and not any("," in t for t in point) and point[-2:] == ["seed=7", "pruning.density=0.1"]
    assert "run=vpns_paper" not in point  # one point is named like any run
    mine, sweep = expand_experiment(["experiment=vpns_paper", "seed=1,2", "run=mine"], sweep=True)
    assert sweep and "seed=7,9,17" not in mine and mine[-2:] == ["seed=1,2", "run=mine"]
    assert "pruning.density=0.6,0.5,0.4,0.3,0.2,0.1" in mine  # the axes not replaced stay
    with pytest.raises(ConfigError, match="experiment=nope is not an option; choose from: .*vpns_paper"):
        expand_experiment(["experiment=nope"], sweep=False)
    with pytest.raises(ConfigError, match="given 2 times"):
        expand_experiment(["experiment=vpns_paper", "experiment=vpns_paper"], sweep=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_recipe_trains_one_step_on_tiny_data(name, dense_run, tmp_path, beton_dir):
    """The recipe with tiny-data overrides (the shared dense network instead of ImageNet weights, the synthetic
    set at 32 px with no per-class limits, one batch per epoch, one epoch per stage, one point): stage=all
    runs search, finetune and eval, one optimizer step each; a dense-only recipe trains one dense step."""
    exp = load_experiment(name)
    recipe = dict(t.split("=", 1) for t in exp.overrides)
    dense_only = recipe.get("stage") == "dense"
    one_point = [f"{key}={values[0]}" for key, values in exp.sweep.items()]
    runs = tmp_path / "runs"
    source = [] if dense_only else [f"model.weights={dense_run / 'r/dense/result/model.pt'}"]
    run_here([f"experiment={name}", *one_point, "run=r", f"runs_dir={runs}", f"data.beton_dir={beton_dir}",
              *source, "data=synthetic", *TINY, "data.train_per_class=null", "data.val_per_class=null",
              "data.synthetic_train_size=64", "prompt.pad=2", "dense.epochs=1", "search.epochs=1",
              "finetune.epochs=1", "log.every_steps=1"])
    stages = ("dense",) if dense_only else ("search", "finetune")
    for stage in stages:
        steps = [json.loads(line)["step"] for line in (runs / "r" / stage / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in line]
        assert steps == [1], (stage, steps)
    if dense_only:
        assert read_json(runs / "r/dense/result/summary.json")["top1"] >= 0
        return
    assert read_json(runs / "r/eval/summary.json")["top1"] >= 0
    assert read_json(runs / "r/search/result/summary.json")["method"] == recipe["method"]  # the recipe's method ran

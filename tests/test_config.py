"""Config composition and the launcher's fail-fast checks (no training)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import launch, run_main, write_image_folder
from trainer.config import ConfigError, load_config, validate_config


def _error_of(tokens):
    with pytest.raises(ConfigError) as e:
        validate_config(load_config(tokens))
    return str(e.value)


def test_defaults_compose_and_validate(tmp_path):
    cfg = load_config([f"runs_dir={tmp_path}"])
    validate_config(cfg)
    assert (cfg.model.name, cfg.data.name, cfg.method.name, cfg.engine.name, cfg.cluster.name) == \
        ("resnet18", "synthetic", "pass", "ddp", "local")
    assert cfg.run == "resnet18-synthetic-pass"


def test_group_and_key_overrides(tmp_path):
    cfg = load_config([f"runs_dir={tmp_path}", "model=vgg16_bn", "dense.epochs=3", "dense.lr=0.05",
                       "pruning.flops_ratio=0.3", "data.batch_size=32", "seed=7"])
    assert cfg.model.name == "vgg16_bn" and cfg.dense.epochs == 3 and cfg.dense.lr == 0.05
    assert cfg.pruning.flops_ratio == 0.3 and cfg.seed == 7
    # A different setting gives a different default run name; the same one gives the same name.
    again = load_config([f"runs_dir={tmp_path}", "model=vgg16_bn", "dense.epochs=3", "dense.lr=0.05",
                         "pruning.flops_ratio=0.3", "data.batch_size=32", "seed=7", "stage=dense"])
    assert again.run == cfg.run and cfg.run.startswith("vgg16_bn-synthetic-pass-")


@pytest.mark.parametrize("tokens, expected", [
    (["dense.epoch=3"], "unknown key 'dense.epoch' (did you mean 'dense.epochs'?)"),
    (["dense.epochs=ten"], "dense.epochs=ten: expected an integer"),
    (["model=resnet99"], "model=resnet99 is not an option; choose from: resnet18, resnet50, vgg16_bn, vit_b_16, vit_tiny"),
    (["stage=searchh"], "stage=searchh is not allowed; choose from: dense, search, finetune, eval, all"),
    (["data=imagefolder"], "data.train_dir is required for data=imagefolder"),
    (["data=imagefolder", "data.train_dir=/no/such/dir"], "data.train_dir=/no/such/dir: no such directory"),
    (["pruning.flops_ratio=1.5"], "pruning.flops_ratio=1.5: must be in (0, 1]"),
    (["data.num_classes=500"], "data.num_classes=500: must be in [2, 128]"),
    (["dense"], "cannot read 'dense': arguments are key=value"),
    (["data.res=true"], "data.res=true: expected an integer"),
    (["data.train_per_class=50"], "data.train_per_class=50: must be at least 1, and only applies to ImageFolder data"),
    (["cluster.nodes=0"], "cluster.nodes=0: must be at least 1"),
    (["cluster.tasks_per_node=0"], "cluster.tasks_per_node=0: must be at least 1 (or null)"),
    (["cluster.timeout_min=1", "cluster.signal_delay_s=120"], "cluster.signal_delay_s=120: must be shorter than"),
])
def test_bad_values_name_the_key(tokens, expected):
    assert expected in _error_of(tokens)


def test_existing_run_keeps_its_groups(tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(load_config([f"runs_dir={tmp_path}", "run=r1", "dense.lr=0.3"])))
    cfg = load_config([f"runs_dir={tmp_path}", "run=r1", "stage=eval"])
    assert cfg.dense.lr == 0.3  # continued with the stored config
    assert "was created with model=resnet18" in _error_of([f"runs_dir={tmp_path}", "run=r1", "model=resnet50"])


@pytest.mark.parametrize("case", ["misspelled", "wrong_type", "unknown_model", "missing_dir", "empty_imagefolder"])
def test_launcher_fails_fast_with_one_line(case, tmp_path):
    """The misspelled key through the real command line, the others through main() in-process. How fast the
    answer comes is measured by benchmarks/startup.py; tests/test_startup.py checks that it imports no torch."""
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "notes.txt").write_text("not an image")
    args = {"misspelled": ["dense.epoch=3"], "wrong_type": ["data.batch_size=big"],
            "unknown_model": ["model=resnet99"], "missing_dir": ["data=imagefolder", f"data.train_dir={tmp_path}/nope"],
            "empty_imagefolder": ["data=imagefolder", f"data.train_dir={empty}"]}[case]
    if case == "misspelled":
        proc = launch(args + [f"runs_dir={tmp_path}/runs"], timeout=60)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = run_main(args + [f"runs_dir={tmp_path}/runs"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists()  # no work started


def test_help_lists_groups_options_and_keys():
    proc = launch(["--help"], timeout=60)  # the real command line
    assert proc.returncode == 0
    out = proc.stdout
    for text in ("model     resnet18*, resnet50, vgg16_bn, vit_b_16, vit_tiny", "data      imagefolder, imagenet, synthetic*",
                 "method", "engine", "cluster", "dense.epochs=8", "finetune.lr=0.01", "data.batch_size=128",
                 "pruning.flops_ratio=0.5", "seed=0"):
        assert text in out, text


def test_print_config_prints_resolved_yaml_and_exits(tmp_path):
    code, out, err = run_main(["print_config=true", "model=resnet50", "search.epochs=2", f"runs_dir={tmp_path}"])
    assert code == 0, err
    cfg = OmegaConf.create(out)
    assert cfg.model.name == "resnet50" and cfg.search.epochs == 2
    assert not any(tmp_path.iterdir())


def test_imagefolder_with_images_passes_validation(tmp_path):
    root = write_image_folder(tmp_path / "tree", per_class=2)
    validate_config(load_config(["data=imagefolder", f"data.train_dir={root}"]))


def test_synthetic_class_limit_matches_the_generator():
    from trainer.config.validate import MAX_SYNTHETIC_CLASSES
    from trainer.data.synthetic import MAX_CLASSES
    assert MAX_SYNTHETIC_CLASSES == MAX_CLASSES


def test_schema_choices_match_the_pruning_code():
    from pruning.hypernet import BUDGET_LOSSES
    from pruning.prompt import PROMPT_VARIANTS
    from pruning.scores import THRESHOLDS
    from trainer.config import schema
    from trainer.config.load import group_options

    from pruning.methods import method_names
    from pruning.methods.pass_ import BUDGET_LOSSES as PASS_BUDGET_LOSSES
    from pruning.methods.vpns import THRESHOLDS as VPNS_THRESHOLDS

    assert schema.PROMPT_VARIANTS == PROMPT_VARIANTS
    assert PASS_BUDGET_LOSSES == BUDGET_LOSSES and VPNS_THRESHOLDS == THRESHOLDS
    # every registered method has its configs/method/<name>.yaml, and every such file but dense a method
    assert set(method_names()) == set(group_options("method")) - {"dense"}


def test_a_method_file_sets_its_own_search_schedule():
    """configs/method/vpns.yaml's `_global_` block sets search.*; the command line still wins."""
    from trainer.config.load import load_config
    vpns = load_config(["method=vpns", "runs_dir=/nonexistent"])
    assert (vpns.search.optimizer, vpns.search.lr, vpns.search.weight_decay) == ("adam", 1e-4, 1e-4)
    hydra = load_config(["method=hydra", "runs_dir=/nonexistent"])
    assert hydra.vpns.threshold == "layer"
    override = load_config(["method=vpns", "search.lr=0.003", "runs_dir=/nonexistent"])
    assert override.search.lr == 0.003
    default = load_config(["method=pass", "runs_dir=/nonexistent"])
    assert default.search.optimizer == "adamw"

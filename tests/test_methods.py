"""The pruning methods through their one interface (pruning/methods): golden decisions and figures.

The golden file holds what every method decided and scored on the session's shared runs (TINY settings,
fixed seeds) when it was recorded; a change of the code around a method must leave all of it equal.
Record it again (only for an intended change of a method's result) with VP_PRUNE_RECORD_GOLDEN=1.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import read_json

GOLDEN = Path(__file__).parent / "golden" / "methods.json"
RECORD = os.environ.get("VP_PRUNE_RECORD_GOLDEN") == "1"
FIGURES = ("top1", "top5", "top1_prompt", "top1_no_prompt", "params", "flops", "flops_ratio_achieved",
           "density_achieved", "weights_kept")


def decision_digest(search_dir: Path) -> str:
    """sha256 of the decision: the kept channels of structure.json, or every mask of masks.pt."""
    if (search_dir / "structure.json").exists():
        groups = read_json(search_dir / "structure.json")["groups"]
        blob = json.dumps(groups, sort_keys=True).encode()
    else:
        import torch
        masks = torch.load(search_dir / "masks.pt", map_location="cpu", weights_only=True)
        blob = b"".join(k.encode() + masks[k].contiguous().numpy().tobytes() for k in sorted(masks))
    return hashlib.sha256(blob).hexdigest()[:16]


def observed(run: Path) -> dict:
    out = {"decision": decision_digest(run / "search" / "result")}
    for stage in ("search", "finetune"):
        summary = read_json(run / stage / "result" / "summary.json")
        out[stage] = {k: summary[k] for k in FIGURES if summary.get(k) is not None}
    return out


def check(name: str, run: Path) -> None:
    got = observed(run)
    if RECORD:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    expected = json.loads(GOLDEN.read_text())[name]
    assert got == expected, f"{name}: {got} != golden {expected}"


def test_golden_pass(pass_run):
    check("pass", pass_run.run)


def test_golden_vpns(vpns_run):
    check("vpns", vpns_run.run)


@pytest.mark.parametrize("method", ["l1", "random", "uniform"])
def test_golden_structured(structured_sweep, method):
    check(method, structured_sweep.runs / "sw" / f"method-{method}")


@pytest.mark.parametrize("method", ["omp", "hydra", "random_unstructured"])
def test_golden_unstructured(unstructured_sweep, method):
    check(method, unstructured_sweep.runs / "sw" / f"method-{method}")


def method_mentions(root: Path) -> list[str]:
    """Where the code under `root` names a method or a method's config section: a string constant equal to
    one, a quoted one inside a longer string, or an attribute/subscript `x.vpns` / `x["pass"]`."""
    import ast
    import re

    from pruning.methods import method_names, sections

    names = set(method_names()) | set(sections())
    # attributes: only the sections (`cfg.vpns`); `.random` and `.uniform` are numpy's and torch's
    quoted = re.compile(r"""["'`](%s)["'`]|\b(%s)\.[a-z_]+=""" % ("|".join(names), "|".join(names)))
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in names or quoted.search(node.value):
                    found.append(f"{where} {node.value[:60]!r}")
            elif isinstance(node, ast.Attribute) and node.attr in sections():
                found.append(f"{where} .{node.attr}")
    return found


def test_stages_and_launcher_never_name_a_method():
    """trainer/ and slurm/ ask the registry; only pruning/methods knows the methods and their settings."""
    repo = Path(__file__).resolve().parents[1]
    assert method_mentions(repo / "trainer") + method_mentions(repo / "slurm") == []


# Every registered method the golden runs above do not cover, in one two-process local sweep (torchrun,
# gloo) of stage=all: a new method module is tested here without a line of test code.
GOLDEN_METHODS = ("pass", "vpns", "l1", "random", "uniform", "omp", "hydra", "random_unstructured")


def other_methods() -> list[str]:
    from pruning.methods import method_names
    return sorted(set(method_names()) - set(GOLDEN_METHODS))


@pytest.fixture(scope="session")
def other_methods_2proc(dense_run, tmp_path_factory, beton_dir):
    from conftest import TINY, build_once, launch

    weights = dense_run / "r" / "dense" / "result" / "model.pt"

    def build(root: Path) -> str:
        out = launch(["-m", f"method={','.join(other_methods())}", "stage=all", "run=sw", f"runs_dir={root}",
                      f"data.beton_dir={beton_dir}", f"model.weights={weights}", *TINY, "finetune.epochs=1",
                      "finetune.prompt=false",  # one plain step per batch: the decisions are what is tested
                      "pruning.flops_ratio=0.4", "pruning.density=0.3"], torchrun=2, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return out.stdout
    root, _ = build_once(tmp_path_factory, "other_methods", build)
    return root / "sw"


def test_every_other_method_runs_all_stages_on_two_processes_and_is_reported(other_methods_2proc):
    """taylor, group_norm, snip (and whatever is registered next): stage=all on two processes, one decision
    on both ranks, the budget met, a row in the sweep's report."""
    from pruning.methods import family_of

    report = (other_methods_2proc / "report" / "report.md").read_text()
    assert other_methods(), "no method beyond the golden ones is registered"
    for method in other_methods():
        run = other_methods_2proc / f"method-{method}"
        search = read_json(run / "search/result/summary.json")
        final = read_json(run / "finetune/result/summary.json")
        assert (run / "eval/result/summary.json").exists()
        assert search["family"] == family_of(method) and search["world_size"] == 2
        digests = search["kept_digest_per_rank" if family_of(method) == "structured" else "mask_digest_per_rank"]
        assert len(digests) == 2 and len(set(digests)) == 1, (method, digests)
        if family_of(method) == "structured":
            assert 0.4 * 0.98 <= final["flops_ratio_achieved"] <= 0.4 * 1.01, (method, final["flops_ratio_achieved"])
        else:
            assert final["density_achieved"] == pytest.approx(0.3, abs=1e-5), method
        assert f"method-{method}" in report, method


def test_pruning_stands_alone_and_its_registry_is_torch_free():
    """The registry imports without torch (--help and the config layer read it); every module of pruning/
    imports without trainer/."""
    import subprocess
    import sys

    code = """
import importlib, pkgutil, sys
import pruning.methods
assert "torch" not in sys.modules, "importing the registry imported torch"
import pruning
for module in pkgutil.walk_packages(pruning.__path__, "pruning."):
    importlib.import_module(module.name)
print(sorted(k for k in sys.modules if k == "trainer" or k.startswith("trainer.")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout

"""Run the requested stage(s) of a run in this process (one of possibly several DDP processes)."""
from __future__ import annotations

from omegaconf import DictConfig

from pruning.methods import STRUCTURED, UNSTRUCTURED, family_of

from ..distributed import detect_env
from ..engines import make_engine
from ..plan import plan  # torch-free (the launcher and stage=status use it); re-exported here
from ..run_dir import SWEEP_FILE, RunDir, timestamped
from .context import StageContext, StageNotImplemented
from .dense import run_dense
from .evaluate import run_eval
from .finetune import run_finetune
from .search import run_search
from .sources import require_pruning_method
from .sparse_finetune import run_sparse_finetune
from .sparse_search import run_sparse_search

STAGE_FUNCTIONS = {"dense": run_dense, "eval": run_eval}
# search and finetune by the family of the method (the registry in pruning/methods says which)
FAMILY_STAGE_FUNCTIONS = {STRUCTURED: {"search": run_search, "finetune": run_finetune},
                          UNSTRUCTURED: {"search": run_sparse_search, "finetune": run_sparse_finetune}}


def stage_function(stage: str, method: str):
    if stage in STAGE_FUNCTIONS:
        return STAGE_FUNCTIONS[stage]
    return FAMILY_STAGE_FUNCTIONS[family_of(method)][stage]


def write_reports(run: RunDir, say) -> None:
    """The run's report, and its sweep's when it is a sweep point: stage=all ends with them."""
    from ..report import write_report  # matplotlib: only once there is something to plot

    roots = [run.root] + ([run.root.parent] if (run.root.parent / SWEEP_FILE).exists() else [])
    for root in roots:
        try:
            say(f"report: {write_report(root)}")
        except Exception as e:  # noqa: BLE001 - a report must never fail a finished training run
            say(f"report: not written for {root} ({type(e).__name__}: {e}); "
                f"retry with stage=report run={root.name} runs_dir={root.parent}")


def run_stages(cfg: DictConfig, stages: list[str] | None = None) -> dict:
    """Run `stages` (default: the plan of `cfg.stage`); returns the last one's summary. Done stages are skipped."""
    stages = stages or plan(cfg)
    for stage in stages:
        if stage in ("search", "finetune"):
            # Checked up front: a dense stage must not spend hours on a pipeline that cannot finish.
            require_pruning_method(cfg.method.name, stage)
    engine = make_engine(cfg.engine, detect_env())
    try:
        if cfg.resume == "never":
            cfg.run = engine.broadcast_object(timestamped(cfg.run))  # one name for every process
        run = RunDir(cfg.runs_dir, cfg.run)
        if engine.is_main:
            run.write_config(cfg)
        engine.barrier()
        ctx = StageContext(cfg, engine, run)
        if run.nothing_to_do(cfg.stage, stages):
            ctx.say(run.finished_note(stages, "nothing to do"))
            return run.summary(stages[-1])
        ctx.say(f"run '{cfg.run}' in {run.root}")
        summary = {}
        for stage in stages:
            if stage != "eval" and run.is_done(stage):
                ctx.say(f"{stage}: already done ({run.result(stage)}), skipping")
                summary = run.summary(stage)
                continue
            summary = stage_function(stage, cfg.method.name)(ctx)
            if stage != "eval":
                ctx.say(f"{stage}: top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  "
                        f"{summary['params'] / 1e6:.2f} M params  {summary['flops'] / 1e6:.1f} M MACs  "
                        f"{summary['images_per_second']:.0f} img/s  {summary['wall_seconds']:.0f} s  -> {run.result(stage)}")
        if cfg.stage == "all" and stages[-1] == plan(cfg)[-1] and engine.is_main:
            write_reports(run, ctx.say)
        return summary
    finally:
        engine.close()


__all__ = ["run_stages", "plan", "StageNotImplemented"]

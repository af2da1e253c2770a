"""What the benchmark scripts share: the description of the machine, their common options and
JSON report, and a timed training step built the way the stages build it.

Imported by the scripts as `benchmarks.common` once they have put the repository
root on sys.path (benchmarks/ has no __init__.py: it is found as a namespace
package there, so `python benchmarks/x.py` from the root works unchanged).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torchvision

from pruning.classifier import ImageClassifier
from pruning.methods.unstructured import prompt_views
from pruning.pass_network import PassSearchNetwork
from pruning.scores import ScoreMasks
from trainer.config.load import load_config
from trainer.loop import optimizer_step
from trainer.optim import make_optimizer, make_scheduler
from trainer.stages.sources import make_prompt  # imports trainer.data, hence FFCV (torch left at 1 thread)

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 1000  # only shapes the (unused) learning-rate schedule


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty or just the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit() -> str | None:
    """The checkout's short commit, so that a stored result can be traced to the code that made it."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load average: other processes on a shared machine skew CPU timings, so it is recorded."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def machine_info(**extra) -> dict:
    """Machine, versions, commit and date for a result's JSON, plus `extra` fields.

    Call it after torch.set_num_threads: `threads` records the setting in force
    (importing FFCV leaves torch at 1 thread until the scripts set it again).
    """
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "git_commit": git_commit(), "load_average_start": load_average(), **extra}


# --------------------------------------------------------------------------- command line and report


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser; --help shows its docstring (usage, what is timed) as written, not re-wrapped."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_args(parser: argparse.ArgumentParser, name: str) -> argparse.Namespace:
    """Adds the options every benchmark has (--threads, --out, last), parses, and applies --threads."""
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (default: all cores; importing FFCV would otherwise leave 1)")
    parser.add_argument("--out", default=f"benchmarks/results/{name}.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # after the imports: FFCV's import sets torch to 1 thread
    return args


def write_report(path: str, report: dict) -> None:
    """Writes the result's JSON (making its folder) and says where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


# --------------------------------------------------------------------------- training step


def stage_config(model: str, method: str, *, device: str, res: int, batch: int, runs_dir: str, overrides=()):
    """The run config the launcher would build for `model= method=` (schema + group files) and `overrides`.

    load_config continues a run stored under runs_dir/bench if there is one: pass an empty folder.
    """
    return load_config([f"model={model}", f"method={method}", f"engine.device={device}", f"data.res={res}",
                        f"data.batch_size={batch}", *overrides, f"runs_dir={runs_dir}", "run=bench"])


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work: CUDA calls return before it ran, so a clock read alone times nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One batch of the training loop (trainer/loop.py optimizer_step per view), through a one-process engine.

    `views`: (name, context factory) pairs; each is one optimizer step on the batch
    under its context (VPNs' dual step: prompted, then unprompted). Default: one
    plain step.
    """

    def __init__(self, cfg, engine, model, params, schedule, views=None):
        self.cfg, self.engine, self.model = cfg, engine, model
        self.views = views or [("", contextlib.nullcontext)]
        optimizer = make_optimizer(params, schedule)
        # As the stages do: the schedule counts optimizer steps, one per view; a view may leave
        # trainable parameters out of its forward (the prompt), whose gradients must then stay unset.
        engine.wrap(model, optimizer, make_scheduler(optimizer, schedule, STEPS_PER_EPOCH * len(self.views)),
                    batch_size=cfg.data.batch_size, grad_clip=schedule.grad_clip,
                    find_unused_parameters=len(self.views) > 1)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=schedule.label_smoothing)
        self.trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    def __call__(self, images, labels, timed: bool = True) -> list[float] | None:
        """Runs one batch; returns the seconds of every view (optimizer step) in it.

        timed=False: no clock and no device sync, returns None. A throughput loop
        times a block of steps itself and must not sync between them: a sync
        drains the GPU queue, so the CPU's launches of the next step would no
        longer overlap the GPU's work, as they do in training.
        """
        engine, seconds = self.engine, []
        chunks = engine.split(images, labels)
        for _, view in self.views:
            if timed:
                sync(engine.device)
                start = time.perf_counter()
            optimizer_step(engine, view, self.loss_fn, chunks)
            if timed:
                sync(engine.device)
                seconds.append(time.perf_counter() - start)
        return seconds if timed else None


def pass_search_step(cfg, engine, backbone) -> TrainStep:
    """The PASS search step over `backbone`, built as pruning/methods/pass_.py (Pass.search) builds it:
    PassSearchNetwork (frozen backbone, hypernetwork, channel masks, prompt, FLOPs model, budget loss),
    the search schedule's optimizer on hypernetwork + prompt (prompt lr pass.prompt_lr)."""
    h = cfg["pass"]
    prompt = make_prompt(cfg) if h.use_prompt else None
    net = PassSearchNetwork(backbone, res=cfg.data.res, prompt=prompt, pass_cfg=h,
                            flops_ratio=cfg.pruning.flops_ratio, residual=cfg.pruning.residual)
    net = engine.prepare_module(net)
    hyper, prompt_params = net.trainable_parameters()
    params = [{"params": hyper}]
    if prompt_params:
        params.append({"params": prompt_params, "lr": h.prompt_lr})
    step = TrainStep(cfg, engine, net, params, cfg.search)
    step.groups = len(net.graph.groups)
    return step


def vpns_search_step(cfg, engine, backbone) -> TrainStep:
    """The VPNs search step over `backbone`, built as pruning/methods/unstructured.py (ScoreSearch) builds it:
    weights frozen, ScoreMasks on every scored weight (global threshold after every optimizer step), the pad
    prompt, the search schedule's optimizer on scores + prompt; with vpns.dual_step (the default) two views,
    prompted then unprompted, each one optimizer step."""
    prompt = make_prompt(cfg)
    for p in backbone.parameters():
        p.requires_grad_(False)
    v = cfg.vpns
    scores = ScoreMasks(backbone, cfg.pruning.density, threshold=v.threshold, exclude_first=v.exclude_first,
                        exclude_classifier=v.exclude_classifier)
    model = engine.prepare_module(ImageClassifier(backbone, prompt))
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(cfg, engine, model, trainable, cfg.search, views=prompt_views(model, v.dual_step))
    step.scores = scores
    return step

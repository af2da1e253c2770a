"""The training loop: epochs of engine steps, evaluation, metrics and resumable checkpoints.

It knows nothing about pruning methods or distribution: a stage hands it the
module, the parameters to train, a loss and a schedule; the engine hides
DDP or DeepSpeed. A module may return `(logits, extra_loss)` instead of
logits (PASS adds its budget term that way) and may expose `last`, a dict of
floats from its latest forward, which is logged with the train records.
Checkpoints carry everything needed to continue exactly where a killed run
stopped, mid-epoch included: engine state (model,
optimizer, schedule), epoch, the next batch, running epoch meters, history,
RNG state and elapsed wall time.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from .engines import Engine
from .metrics import MetricsLog, topk_correct
from .optim import make_optimizer, make_scheduler
from .preemption import STOP, Preempted, StopVote, stop_agreed

# Test-only: seconds to sleep after every optimizer step, so that a kill, a preemption, a cancel or a
# time limit lands mid-run on any machine, however fast (docs/testing.md). Sleeping changes no result.
STEP_DELAY_ENV = "VP_PRUNE_TEST_STEP_DELAY_S"
# Test-only: with this set, only a session that starts from scratch sleeps; a resumed one runs at full speed
# (a first job that cannot finish before its time limit on any machine, and a requeued one that can).
STEP_DELAY_FRESH_ONLY_ENV = "VP_PRUNE_TEST_STEP_DELAY_FRESH_ONLY"


@dataclass
class FitResult:
    history: list = field(default_factory=list)   # one record per finished epoch
    final: dict = field(default_factory=dict)     # last evaluation
    images_per_second: float = 0.0                # median over epochs, all processes together
    wall_seconds: float = 0.0                     # across restarts
    resumed_from: str | None = None


class NonFiniteLoss(ValueError):
    """Training reached a non-finite loss (or weights): the stage stops on every process, publishes nothing
    and keeps its last good checkpoint."""


def split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, extra loss or None) from a module's output."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


@torch.no_grad()
def evaluate(engine: Engine, model: torch.nn.Module, loader, loss_fn=None) -> dict:
    """Top-1/top-5 (in %) and mean loss over every validation record, summed over processes.

    Pass the plain module, not the DDP wrapper: processes may hold one batch
    more or less of the validation set, and a wrapper's per-forward collectives
    would then wait forever.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=engine.device)  # loss, top1, top5, count
    batches = _batches_in_step(engine, loader)
    for images, labels, _ in batches:
        with engine.autocast():
            logits, _ = split_output(model(images))
        if labels is None:  # a forward only to join the other processes' gathers
            continue
        c1, c5 = topk_correct(logits, labels)
        loss = loss_fn(logits.float(), labels) * len(labels) if loss_fn else torch.zeros((), device=engine.device)
        sums += torch.stack([loss.double(), c1.double(), c5.double(), _count(labels, engine.device)])
    engine.all_reduce_sum(sums)
    model.train(was_training)
    n = max(1.0, sums[3].item())
    return {"top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "loss": sums[0].item() / n, "count": int(sums[3].item())}


def _batches_in_step(engine: Engine, loader):
    """The loader's batches; under ZeRO-3, padded with repeats (labels None) to the most any process has.

    Every ZeRO-3 forward gathers parameters from all processes, so each must run as many forwards.
    """
    if not engine.forward_has_collectives:
        yield from loader
        return
    most = torch.tensor([len(loader)], dtype=torch.int64)
    engine.all_reduce_max(most)
    n, last = 0, None
    for last in loader:
        n += 1
        yield last
    for _ in range(int(most.item()) - n):
        yield last[0], None, None


def _count(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """len(labels) as a float64 device scalar. torch.full launches a fill kernel; torch.tensor would copy from
    pageable host memory, which on CUDA waits for the stream (a sync per step)."""
    return torch.full((), float(len(labels)), dtype=torch.float64, device=device)


def _rng_state(device: torch.device) -> dict:
    """The generators a checkpoint restores: the CPU's, and the GPU's when training on one."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(ckpt: dict, device: torch.device) -> None:
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:  # none in a CPU run's checkpoint or an older one
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def _view_losses(views, summed: torch.Tensor) -> dict:
    """Mean loss of every view after the first, named loss_<view>."""
    return {f"loss_{name}": summed[2 + i].item() / summed[2].item() for i, (name, _) in enumerate(views[1:], 1)}


def _say(engine: Engine, msg: str) -> None:
    if engine.is_main:
        tqdm.write(msg, file=sys.stdout)


def optimizer_step(engine: Engine, view: Callable, loss_fn: Callable, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch under `view` (a context factory: the prompt on or off), accumulating
    gradients over the engine's micro-batches `chunks`. Returns the loss summed over the batch and the
    logits, both left on the device (no sync). The loop and the benchmarks take their steps here."""
    loss_sum, outs = 0.0, []
    for i, (x, y) in enumerate(chunks):
        with engine.micro_step(last=i + 1 == len(chunks)):
            with view(), engine.autocast():
                out, extra = split_output(engine.module(x))
                loss = loss_fn(out.float(), y)
                if extra is not None:  # PASS's budget term
                    loss = loss + extra.float()
            engine.backward(loss)
        engine.step()
        loss_sum = loss_sum + loss.detach().double() * len(y)
        outs.append(out.detach())
    return loss_sum, torch.cat(outs)


def _restore(engine: Engine, ckpt: dict | None, view_names: list[str], meters: torch.Tensor, log: MetricsLog,
             desc: str) -> tuple[int, int, int, float, list[dict]]:
    """(epoch, batch, step, elapsed seconds, history) to continue from: the checkpoint's, or the start. Fills
    `meters` with the checkpoint's running sums and cuts metrics.jsonl back to its step."""
    if ckpt is None:
        log.truncate_after(0)
        return 0, 0, 0, 0.0, []
    if ckpt.get("views", [""]) != view_names:
        raise ValueError(f"{ckpt['_path']} was written with {len(ckpt.get('views', ['']))} optimizer step(s) per "
                         f"batch ({ckpt.get('views')}), this run takes {len(view_names)} ({view_names}): "
                         f"restore the setting that changed (vpns.dual_step, finetune.prompt) or use resume=never")
    epoch, batch, step, elapsed = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["elapsed"]
    _set_rng_state(ckpt, engine.device)
    if engine.is_main:  # the saved meters are already summed over processes
        meters.copy_(ckpt["meters"])
    if batch and ckpt["world_size"] != engine.world_size:
        # Batch positions are per process: they mean other samples on another process count.
        _say(engine, f"{desc}: checkpoint written by {ckpt['world_size']} process(es), running on "
                     f"{engine.world_size}: epoch {epoch + 1} restarts from its first batch")
        batch = 0
        meters.zero_()
    log.truncate_after(step)
    _say(engine, f"{desc}: resumed from {ckpt['_path']} at epoch {epoch + 1}, batch {batch} (step {step})")
    return epoch, batch, step, elapsed, ckpt["history"]


def fit(*, engine: Engine, model: torch.nn.Module, params, schedule: DictConfig, train_loader,
        val_loader, stage_dir: Path, checkpoint_cfg: DictConfig, log_cfg: DictConfig,
        loss_fn: Callable, resume: bool, desc: str,
        views: list[tuple[str, Callable]] | None = None, tensorboard: bool = False) -> FitResult:
    """Train `params` of `model` for `schedule.epochs`, resuming from the stage's checkpoints if any.

    `views`: (name, context factory) pairs; every batch takes one optimizer step
    per view. The first view's loss and accuracy are the epoch's headline.
    `tensorboard`: also log to <stage_dir>/tensorboard/ (logger=tensorboard).
    """
    views = views or [("", contextlib.nullcontext)]
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has fewer images than one batch per process "
                         f"({train_loader.batch_size}); lower data.batch_size")
    optimizer = make_optimizer(params, schedule)
    # A later view may leave parameters unused (the prompt, in the step without it): DDP must then
    # look for them, and leaves their gradient unset so the optimizer skips them in that step.
    engine.wrap(model, optimizer, make_scheduler(optimizer, schedule, steps_per_epoch * len(views)),
                batch_size=train_loader.batch_size, grad_clip=schedule.grad_clip,
                find_unused_parameters=len(views) > 1)
    checkpoints = stage_dir / "checkpoints"
    log = MetricsLog(stage_dir / "metrics.jsonl", enabled=engine.is_main,
                     tensorboard_dir=stage_dir / "tensorboard" if tensorboard else None)

    # loss sum, correct, count (first view), then the loss sum of every further view
    meters = torch.zeros(2 + len(views), dtype=torch.float64, device=engine.device)
    view_names = [name for name, _ in views]
    ckpt = engine.load_checkpoint(checkpoints, log=lambda m: _say(engine, m)) if resume else None
    epoch, batch, step, elapsed, history = _restore(engine, ckpt, view_names, meters, log, desc)
    result = FitResult(resumed_from=ckpt["_path"] if ckpt is not None else None)
    # The first step whose loss was not finite, kept on the device (no sync per step); checked wherever the
    # loop syncs anyway: before a metrics record, a checkpoint and the epoch's end (all after an all-reduce,
    # so every process stops at the same point).
    first_bad = torch.full((), -1, dtype=torch.long, device=engine.device)
    last_good = [ckpt["_path"] if ckpt is not None else None]

    def stop_if_not_finite(summed: torch.Tensor, weights: bool = False) -> None:
        ok = bool(torch.isfinite(summed).all())
        if ok and weights:  # a finite loss can still leave non-finite weights behind (its gradient was not)
            trained = [torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]
            ok = bool(torch.stack(trained).all()) if trained else True
        if ok:
            return
        bad = int(first_bad.item()) if int(first_bad.item()) >= 0 else step
        log.close()
        raise NonFiniteLoss(
            f"{desc}: the loss is not finite ({float(summed[0] / summed[2].clamp(min=1)):.4g}) from step {bad} "
            f"(epoch {epoch + 1}); nothing was published, the last good checkpoint is "
            f"{last_good[0] or 'none (the run starts over)'}. Try a lower {desc}.lr, {desc}.warmup_epochs or "
            f"{desc}.grad_clip")
    session_start = time.time()

    def save(next_epoch: int, next_batch: int, epoch_meters: torch.Tensor) -> Path:
        summed = engine.all_reduce_sum(epoch_meters.clone())  # collective: every rank calls save
        stop_if_not_finite(summed, weights=True)  # never overwrite a good checkpoint with a broken state
        last_good[0] = engine.save_checkpoint(
            checkpoints, {"epoch": next_epoch, "batch": next_batch, "step": step, "meters": summed.cpu(),
                          "history": history, **_rng_state(engine.device),
                          "elapsed": elapsed + time.time() - session_start, "world_size": engine.world_size,
                          "views": view_names},
            step, keep=checkpoint_cfg.keep)
        return last_good[0]

    interactive = sys.stderr.isatty()
    step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
    if ckpt is not None and os.environ.get(STEP_DELAY_FRESH_ONLY_ENV):
        step_delay = 0.0
    vote = StopVote(engine)
    for epoch in range(epoch, schedule.epochs):
        model.train()
        start_batch, seen, t0 = batch, 0, time.time()
        bar = tqdm(train_loader.epoch(epoch, start_batch), total=steps_per_epoch, initial=start_batch,
                   desc=f"{desc} {epoch + 1}/{schedule.epochs}", disable=not (engine.is_main and log_cfg.progress),
                   mininterval=1 if interactive else 30, dynamic_ncols=True, leave=False)
        for batch, (images, labels, _) in enumerate(bar, start=start_batch):
            chunks = engine.split(images, labels)
            steps = [optimizer_step(engine, view, loss_fn, chunks) for _, view in views]
            losses, logits = [loss for loss, _ in steps], steps[0][1]
            step += 1
            seen += len(labels)
            step_meters = torch.stack([losses[0], topk_correct(logits, labels, ks=(1,))[0].double(),
                                       _count(labels, engine.device), *losses[1:]])
            meters += step_meters
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_meters).all(), step, first_bad)
            if step % log_cfg.every_steps == 0:
                running = engine.all_reduce_sum(meters.clone())
                stop_if_not_finite(running)  # before the record: metrics.jsonl ends at the last finite step
                record = {"kind": "train", "step": step, "epoch": epoch + (batch + 1) / steps_per_epoch,
                          "loss": running[0].item() / running[2].item(), "lr": engine.scheduler.get_last_lr()[0],
                          **_view_losses(views, running), **getattr(model, "last", {})}
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if step_delay:
                time.sleep(step_delay)
            last_batch = batch + 1 == steps_per_epoch
            if not last_batch and vote.poll():
                # Preemption or time limit: save this exact position on every rank, then let the job requeue.
                # (On an epoch's last batch the stop waits for the epoch-end checkpoint just below.)
                STOP.acknowledge()
                path = save(epoch, batch + 1, meters)
                bar.close()
                _say(engine, f"{desc}: checkpointed at epoch {epoch + 1}, batch {batch + 1} (step {step}) for requeue")
                raise Preempted(step, str(path))
            if checkpoint_cfg.every_steps and step % checkpoint_cfg.every_steps == 0 and not last_batch:
                save(epoch, batch + 1, meters)
        bar.close()
        seconds = time.time() - t0
        train = engine.all_reduce_sum(meters.clone())
        stop_if_not_finite(train)
        val = evaluate(engine, engine.raw, val_loader, loss_fn)
        record = {"kind": "epoch", "step": step, "epoch": epoch + 1,
                  "train_loss": train[0].item() / train[2].item(), "train_top1": 100 * train[1].item() / train[2].item(),
                  "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
                  "lr": engine.scheduler.get_last_lr()[0], "epoch_seconds": seconds,
                  **{f"train_{k}": v for k, v in _view_losses(views, train).items()},
                  "images_per_second": seen * engine.world_size / max(seconds, 1e-9), **getattr(model, "last", {})}
        history.append(record)
        log.write(record)
        extra = f"  mask FLOPs {record['mask_flops_ratio']:.3f}" if "mask_flops_ratio" in record else ""
        _say(engine, f"{desc} epoch {epoch + 1}/{schedule.epochs}: loss {record['train_loss']:.4f}  "
                     f"val top-1 {val['top1']:.2f}%  top-5 {val['top5']:.2f}%{extra}  "
                     f"{record['images_per_second']:.0f} img/s")
        batch = 0
        meters.zero_()
        path = save(epoch + 1, 0, meters)
        vote.settle()  # a mid-epoch vote still in flight (any stop it carries, the vote below carries too)
        if epoch + 1 < schedule.epochs and stop_agreed(engine):
            STOP.acknowledge()
            _say(engine, f"{desc}: checkpointed after epoch {epoch + 1} (step {step}) for requeue")
            raise Preempted(step, str(path))

    result.history = history
    result.final = evaluate(engine, engine.raw, val_loader, loss_fn) if not history else {
        "top1": history[-1]["val_top1"], "top5": history[-1]["val_top5"], "loss": history[-1]["val_loss"]}
    speeds = [h["images_per_second"] for h in history]
    result.images_per_second = statistics.median(speeds) if speeds else 0.0
    result.wall_seconds = elapsed + time.time() - session_start
    log.close()
    engine.unwrap()  # the caller keeps its module; optimizer state and wrappers are freed before the next stage
    return result

"""DeepSpeed checkpoints that a torn write cannot spoil, and that resume on another process count.

Layout under a stage's `checkpoints/`:

    step-000000123/            DeepSpeed's save_checkpoint tag: one model/optimizer shard per rank,
                               the loop's state as client state
    step-000000123/complete.json   written (atomically) only once every rank's shards are on disk
    latest                     DeepSpeed's pointer to the newest complete tag (its zero_to_fp32 reads it)

A resume takes the newest tag with `complete.json`; a tag without one (a kill
mid-save) is never trusted and older complete ones remain. A checkpoint
written by another number of processes is converted once with DeepSpeed's
universal-checkpoint tool (`ds_to_universal`, into `<tag>-universal/`) and
loaded from that, optimizer state included.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..run_dir import DEEPSPEED_COMPLETE as COMPLETE
from ..run_dir import DEEPSPEED_UNIVERSAL as UNIVERSAL
from ..run_dir import complete_deepspeed_tags

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step-{step:09d}"


def complete_tags(directory: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    return complete_deepspeed_tags(directory)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_files(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save(engine, directory: Path, loop_state: dict, step: int, keep: int) -> Path:
    tag = tag_for(step)
    target = directory / tag
    if engine.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        (target / COMPLETE).unlink(missing_ok=True)  # being overwritten: untrusted until whole again
    engine.barrier()
    engine._ds.save_checkpoint(str(directory), tag=tag, client_state={"loop": loop_state}, save_latest=False)
    _sync_files(target)
    engine.barrier()  # every rank's shards are on disk
    if engine.is_main:
        meta = {"step": step, "world_size": engine.world_size, "zero_stage": engine.zero_stage}
        _replace_text(target / COMPLETE, json.dumps(meta) + "\n")
        _replace_text(directory / LATEST, tag)
        for old in complete_tags(directory)[keep + 1:]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + UNIVERSAL), ignore_errors=True)
        for torn in directory.glob("step-*"):   # older tags a kill left without their marker
            if torn.is_dir() and torn.name < tag and not torn.name.endswith(UNIVERSAL) \
                    and not (torn / COMPLETE).exists():
                shutil.rmtree(torn, ignore_errors=True)
    engine.barrier()
    return target


def load(engine, directory: Path, log) -> dict | None:
    for target in complete_tags(directory):
        meta = json.loads((target / COMPLETE).read_text())
        try:
            if meta["world_size"] != engine.world_size:
                path, client = _load_universal(engine, target, meta, log)
            else:
                path, client = engine._ds.load_checkpoint(str(directory), tag=target.name)
        except Exception as e:  # noqa: BLE001 - a checkpoint that does not load means: try an older one
            log(f"checkpoint {target} could not be loaded ({type(e).__name__}: {e}); trying an older one")
            continue
        if path is None:
            log(f"checkpoint {target} could not be loaded; trying an older one")
            continue
        state = dict(client["loop"])
        state["_path"] = str(target)
        return state
    return None


def _load_universal(engine, target: Path, meta: dict, log):
    """Load a checkpoint of another process count through DeepSpeed's universal format."""
    universal = target.with_name(target.name + UNIVERSAL)
    if engine.is_main and not (universal / COMPLETE).exists():
        log(f"checkpoint {target.name} was written by {meta['world_size']} process(es); converting it for "
            f"{engine.world_size} with DeepSpeed's ds_to_universal")
        to_universal(target, universal)
    engine.barrier()
    config = engine._ds._config
    config.load_universal_checkpoint = True
    try:
        path, client = engine._ds.load_checkpoint(str(universal.parent), tag=universal.name)
    finally:
        config.load_universal_checkpoint = False
    if path is not None:  # the client state travels in the original tag's rank-0 model file
        client = _client_state(target)
    return path, client


def _client_state(target: Path) -> dict:
    import torch
    files = sorted(target.glob("*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False)


def to_universal(target: Path, universal: Path) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    shutil.rmtree(universal, ignore_errors=True)
    ds_to_universal(Namespace(input_folder=str(target), output_folder=str(universal), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True))
    _replace_text(universal / COMPLETE, json.dumps({"from": target.name}) + "\n")

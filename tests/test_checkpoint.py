"""Checkpoint store, schedules and environment detection (unit level)."""
from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from trainer.checkpoint import CheckpointStore
from trainer.distributed import detect_env
from trainer.metrics import MetricsLog, topk_correct
from trainer.optim import lr_factor


def test_store_keeps_older_and_falls_back_when_last_is_damaged(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        store.save({"step": step}, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev-000000030.pt", "prev-000000040.pt"]
    assert store.load_latest()["step"] == 40
    store.last.write_bytes(b"torn write")
    messages = []
    state = store.load_latest(log=messages.append)
    assert state["step"] == 30 and "unreadable" in messages[0]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_a_save_killed_mid_write_leaves_last_in_place(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=2)
    store.save({"step": 10}, 10)

    def dies_mid_write(obj, f):  # stands in for the process being killed while torch.save writes
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_mid_write)
    try:
        store.save({"step": 20}, 20)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert store.newest() == store.last and store.load_latest()["step"] == 10


def test_empty_store_has_nothing_to_resume(tmp_path):
    assert CheckpointStore(tmp_path / "none").load_latest() is None


def test_lr_schedules():
    s = OmegaConf.create({"epochs": 10, "warmup_epochs": 1, "schedule": "cosine", "step_size": 3})
    assert lr_factor(0, s, 100) == 1 / 100 and lr_factor(99, s, 100) == 1.0
    assert math.isclose(lr_factor(100 + 450, s, 100), 0.5)
    assert lr_factor(1000, s, 100) < 1e-9
    s.schedule, s.warmup_epochs = "step", 0
    assert lr_factor(299, s, 100) == 1.0 and math.isclose(lr_factor(300, s, 100), 0.1)


def test_detect_env_torchrun_slurm_single():
    assert detect_env({}).world_size == 1
    tr = detect_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.source) == (1, 4, 1, "n1", 1234, "torchrun")
    sl = detect_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "777",
                     "SLURM_JOB_NODELIST": "gpu01", "MASTER_ADDR": "gpu01"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.master_port, sl.source) == (3, 8, 3, "gpu01", 20777, "slurm")
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"


def test_topk_and_metrics_log(tmp_path):
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    c1, c2 = topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert (c1.item(), c2.item()) == (1, 2)
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"step": step})
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]

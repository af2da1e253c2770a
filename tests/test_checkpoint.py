"""Checkpoint store, schedules, environment and device detection, the engines' GPU settings (unit level).

torch.cuda.is_available() is false here: the GPU branches run with torch.cuda's functions faked."""
from __future__ import annotations

import math
import socket
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from trainer.checkpoint import CheckpointStore
from trainer.distributed import DistEnv, detect_env
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


def test_node_count_and_the_rendezvous_line():
    from trainer.distributed import rendezvous_line
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "5",
             "SLURM_JOB_NUM_NODES": "2", "MASTER_ADDR": "localhost"}
    assert detect_env(slurm).num_nodes == 2
    assert detect_env({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"}).num_nodes == 2
    assert detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).num_nodes == 1
    line = rendezvous_line(detect_env(slurm), {}, hostname="localhost")
    assert line == "rank 1/2 on 2 nodes: rendezvous tcp://localhost:20005 (127.0.0.1), sockets: host localhost (127.0.0.1)"
    assert rendezvous_line(detect_env(slurm), {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib0"}).endswith(
        "sockets: GLOO_SOCKET_IFNAME=ib0, NCCL_SOCKET_IFNAME=ib0")


def test_a_multi_node_job_whose_host_name_is_loopback_fails_naming_the_interface_variable():
    """Debian's /etc/hosts maps the host's own name to 127.0.1.1: gloo would listen there, and the other nodes
    would wait at the rendezvous until its 30-minute timeout. One node, or a pinned interface, is fine."""
    from trainer.distributed import check_multi_node_network
    two_nodes = detect_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    with pytest.raises(RuntimeError, match=r"'localhost' resolves to the loopback address 127\.0\.0\.1.*GLOO_SOCKET_IFNAME"):
        check_multi_node_network(two_nodes, {}, hostname="localhost")
    with pytest.raises(RuntimeError, match="does not resolve"):
        check_multi_node_network(two_nodes, {}, hostname="no-such-host.invalid")
    check_multi_node_network(two_nodes, {"GLOO_SOCKET_IFNAME": "eth0"}, hostname="localhost")
    check_multi_node_network(detect_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}), {}, hostname="localhost")


def test_topk_and_metrics_log(tmp_path):
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    c1, c2 = topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert (c1.item(), c2.item()) == (1, 2)
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"step": step})
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]


def test_local_rank_without_local_rank_is_slurms_or_unknown():
    """RANK/WORLD_SIZE without LOCAL_RANK: SLURM's SLURM_LOCALID, else unknown, which picking one of several GPUs
    refuses (it used to be 0: every process of a node on cuda:0)."""
    from trainer.engines.base import cuda_index
    base = {"RANK": "3", "WORLD_SIZE": "8"}
    assert detect_env({**base, "SLURM_LOCALID": "3"}).local_rank == 3
    assert detect_env({**base, "SLURM_LOCALID": "3", "LOCAL_RANK": "1"}).local_rank == 1  # torchrun's wins
    assert detect_env(base).local_rank is None
    assert detect_env({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0
    assert (cuda_index(3, 8), cuda_index(3, 1), cuda_index(None, 1)) == (3, 0, 0)  # one GPU per task: cuda:0
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        cuda_index(None, 8)
    with pytest.raises(RuntimeError, match="only 4 GPUs"):
        cuda_index(5, 4)


@pytest.mark.parametrize("environ", [{"SLURM_GPUS_ON_NODE": "8"}, {"SLURM_JOB_GPUS": "0,1"},
                                     {"CUDA_VISIBLE_DEVICES": "0"}, {}])
def test_no_gpu_in_a_job_given_gpus_is_an_error_naming_the_driver(monkeypatch, environ):
    """The wheel's CUDA needs a recent driver; with an older one torch sees no GPU, and device=auto must not
    quietly train a GPU job on the CPU. engine.device=cpu still does so on purpose."""
    from trainer.config import load_config
    from trainer.engines import DDPEngine
    from trainer.engines.base import pick_device
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert pick_device("cpu", 0) == torch.device("cpu")
    if not environ:
        assert pick_device("auto", 0) == torch.device("cpu")
        with pytest.raises(RuntimeError, match="engine.device=cuda"):
            pick_device("cuda", 0)
        return
    with pytest.raises(RuntimeError) as error:
        DDPEngine(load_config(["engine.device=auto"]).engine, DistEnv())
    key, value = next(iter(environ.items()))
    assert f"{key}={value}" in str(error.value) and "nvidia-smi" in str(error.value), error.value
    assert f"CUDA {torch.version.cuda}" in str(error.value) or torch.version.cuda is None, error.value


def test_no_gpu_markers_mean_no_gpus():
    from trainer.engines.base import gpus_requested
    for environ in ({}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"},
                    {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, {"SLURM_GPUS_ON_NODE": "0"}):
        assert gpus_requested(environ) is None, environ


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as if one GPU were visible (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def test_both_engines_take_the_same_gpu_and_each_rank_says_which(fake_gpu, capsys):
    """Each task sees one GPU while SLURM_LOCALID is 3: DDP takes cuda:0 (cuda_index) and DeepSpeed, which takes
    its GPU from LOCAL_RANK alone, gets LOCAL_RANK=0 (it got 3: a GPU the task cannot see)."""
    from trainer.config import load_config
    from trainer.engines import DDPEngine
    from trainer.engines.base import device_line
    from trainer.engines.deepspeed import deepspeed_env
    engine = DDPEngine(load_config([]).engine, DistEnv())
    assert engine.device == torch.device("cuda", 0) and torch.backends.cudnn.benchmark
    assert capsys.readouterr().out == f"rank 0/1 on cuda:0 (Fake H100, host {socket.gethostname()})\n"
    assert device_line(3, 8, torch.device("cpu")) == f"rank 3/8 on cpu (host {socket.gethostname()})"
    srun_task = DistEnv(rank=3, world_size=8, local_rank=3)
    assert deepspeed_env(engine.device, srun_task, {}) == {"LOCAL_RANK": "0", "RANK": "3", "WORLD_SIZE": "8"}
    assert deepspeed_env(engine.device, srun_task, {"LOCAL_RANK": "3"})["LOCAL_RANK"] == "0"
    on_cpu = deepspeed_env(torch.device("cpu"), DistEnv(rank=1, world_size=2, local_rank=None), {"RANK": "1"})
    assert on_cpu == {"LOCAL_RANK": "0", "RANK": "1", "WORLD_SIZE": "2"}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_deepspeed_reduces_gradients_in_fp32_like_ddp(precision):
    """DeepSpeed 0.19.8 under torch_autocast reduces the gradients of the modules in
    lower_precision_safe_modules (default: Linear and Conv, so the VPNs scores and the hypernetwork) in bf16,
    whatever communication_data_type says; the config lists none, and says fp32 for the other path.
    (Checked against DeepSpeed itself: every parameter's get_param_comm_dtype is float32 under ZeRO-2 and 3.)"""
    from trainer.config import load_config
    from trainer.engines.deepspeed import DeepSpeedEngine
    cfg = load_config(["engine=deepspeed", f"engine.precision={precision}"]).engine
    engine = SimpleNamespace(zero_stage=2, micro_batches=1, world_size=2, cfg=cfg,
                             autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    config = DeepSpeedEngine.ds_config(engine, batch_size=16, grad_clip=0.0)  # what wrap hands to DeepSpeed
    assert config["communication_data_type"] == "fp32"
    if precision == "bf16":
        assert config["torch_autocast"] == {"enabled": True, "dtype": "torch.bfloat16",
                                            "lower_precision_safe_modules": []}
    else:
        assert "torch_autocast" not in config


def test_checkpoints_carry_the_gpus_rng_and_older_ones_still_load(monkeypatch):
    from trainer.loop import _rng_state, _set_rng_state
    gpu, restored = torch.device("cuda", 0), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state[0].item(), device)))
    state = _rng_state(gpu)
    assert state["cuda_rng"][0] == 7 and torch.equal(state["rng"], torch.get_rng_state())
    assert set(_rng_state(torch.device("cpu"))) == {"rng"}
    _set_rng_state(state, gpu)
    _set_rng_state({"rng": torch.get_rng_state()}, gpu)  # a checkpoint from before the GPU's state was saved
    assert restored == [(7, gpu)]


def test_published_search_state_is_on_the_cpu():
    from trainer.checkpoint import cpu_copy
    weight = torch.ones(2, requires_grad=True)
    state = cpu_copy({"hypernet": OrderedDict(w=weight), "prompt": None, "masks": [weight * 2]})
    assert type(state["hypernet"]) is OrderedDict and not state["hypernet"]["w"].requires_grad
    assert state["prompt"] is None and state["masks"][0].device.type == "cpu"


def test_ddp_broadcasts_buffers_only_when_a_forward_changes_them():
    """BatchNorm statistics in training follow rank 0's (DDP's broadcast_buffers); a frozen backbone, whose
    train() keeps BatchNorm in eval mode (PASS's search), needs no broadcast before every forward."""
    from trainer.engines.ddp import forward_updates_buffers

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

        def train(self, mode=True):
            super().train(mode)
            self.backbone.eval()
            return self

    trained, frozen = Frozen().backbone, Frozen()
    trained.eval()
    assert forward_updates_buffers(trained) and not forward_updates_buffers(frozen)
    assert not trained.training and not trained[1].training  # the modes are left as they were

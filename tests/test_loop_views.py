"""The training loop's `views` (VPNs' dual step): one optimizer step per view, the prompt left out of the second."""
from __future__ import annotations

import contextlib

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pruning.prompt import PadPrompt
from trainer.config.schema import root_config
from trainer.distributed import DistEnv
from trainer.engines import make_engine
from trainer.loop import fit
from trainer.models import ImageClassifier
from trainer.optim import make_optimizer

RES = 16


class Batches:
    """A fixed list of (uint8 images, labels, indices) batches with the loader's `epoch()` interface."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, len(batches[0][1])

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch, skip_batches=0):
        return iter(self.batches[skip_batches:])

    def __iter__(self):
        return iter(self.batches)


def _model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return ImageClassifier(backbone, PadPrompt(RES, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (4, 3, RES, RES), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (4,), generator=g), torch.arange(4)) for _ in range(3)]


def _schedule():
    s = OmegaConf.to_container(root_config().search)
    s.update(epochs=1, lr=0.05, optimizer="adam", weight_decay=1e-4, schedule="constant")
    return OmegaConf.create(s)


def test_dual_step_takes_a_prompted_then_an_unprompted_step(tmp_path):
    """fit(views=[prompt, no_prompt]) equals a hand-written loop; the prompt moves only in the first step."""
    cfg = root_config()
    engine = make_engine(cfg.engine, DistEnv())
    data = _data()
    model = _model()
    views = [("prompt", contextlib.nullcontext), ("no_prompt", model.without_input_transform)]
    fit(engine=engine, model=model, params=list(model.parameters()), schedule=_schedule(),
        train_loader=Batches(data), val_loader=Batches(data), stage_dir=tmp_path, checkpoint_cfg=cfg.checkpoint,
        log_cfg=OmegaConf.merge(cfg.log, {"progress": False}), loss_fn=nn.CrossEntropyLoss(), resume=False,
        desc="t", views=views)

    ref = _model()
    opt = make_optimizer(list(ref.parameters()), _schedule())
    loss_fn = nn.CrossEntropyLoss()
    unprompted_moves = []
    for images, labels, _ in data:
        loss_fn(ref(images), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        before = ref.input_transform.program.detach().clone()
        with ref.without_input_transform():
            loss_fn(ref(images), labels).backward()
        assert ref.input_transform.program.grad is None  # the unprompted step never sees the prompt
        opt.step()
        opt.zero_grad(set_to_none=True)
        unprompted_moves.append(not torch.equal(before, ref.input_transform.program))
    assert not any(unprompted_moves), "Adam moved the prompt in a step that did not use it"
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert ref.input_transform.program.abs().sum() > 0

    # The same loop with the prompt left on in both steps ends elsewhere: the second view matters.
    both = _model()
    engine2 = make_engine(cfg.engine, DistEnv())
    fit(engine=engine2, model=both, params=list(both.parameters()), schedule=_schedule(),
        train_loader=Batches(data), val_loader=Batches(data), stage_dir=tmp_path / "b", checkpoint_cfg=cfg.checkpoint,
        log_cfg=OmegaConf.merge(cfg.log, {"progress": False}), loss_fn=nn.CrossEntropyLoss(), resume=False,
        desc="t", views=[("prompt", contextlib.nullcontext), ("again", contextlib.nullcontext)])
    assert not torch.allclose(both.input_transform.program, model.input_transform.program)


def test_resume_refuses_a_checkpoint_with_other_views(tmp_path):
    cfg = root_config()
    data = _data()
    log = OmegaConf.merge(cfg.log, {"progress": False})
    model = _model()
    fit(engine=make_engine(cfg.engine, DistEnv()), model=model, params=list(model.parameters()),
        schedule=_schedule(), train_loader=Batches(data), val_loader=Batches(data), stage_dir=tmp_path,
        checkpoint_cfg=cfg.checkpoint, log_cfg=log, loss_fn=nn.CrossEntropyLoss(), resume=True, desc="t")
    other = _model()
    with pytest.raises(ValueError, match="optimizer step"):
        fit(engine=make_engine(cfg.engine, DistEnv()), model=other, params=list(other.parameters()),
            schedule=_schedule(), train_loader=Batches(data), val_loader=Batches(data), stage_dir=tmp_path,
            checkpoint_cfg=cfg.checkpoint, log_cfg=log, loss_fn=nn.CrossEntropyLoss(), resume=True, desc="t",
            views=[("prompt", contextlib.nullcontext), ("no_prompt", other.without_input_transform)])

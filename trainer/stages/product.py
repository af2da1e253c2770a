"""A stage's trained network as saved in result/: weights plus what is needed to rebuild it.

`model.pt` holds the backbone's state dict, the architecture name, classes,
resolution and (when one was trained) the visual prompt. A pruned network
also has `structure.json` next to it: `load_product` builds the dense
torchvision architecture, cuts it to that structure and loads the weights, so
no search state is needed to use a pruned model.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from pruning.attention import convert_attention
from pruning.extract import STRUCTURE_FILE, rebuild
from pruning.prompt import PadPrompt

from ..models import ImageClassifier, build_backbone
from ..run_dir import write_json

PRODUCT_FILE = "model.pt"


def save_product(directory: Path, model: ImageClassifier, *, arch: str, classes, res: int,
                 structure: dict | None = None) -> None:
    prompt = model.input_transform
    blob = {"model": {k: v.cpu() for k, v in model.backbone.state_dict().items()},
            "arch": arch, "classes": list(classes), "res": res}
    if isinstance(prompt, PadPrompt):
        blob["prompt"] = {"size": prompt.size, "pad": prompt.pad, "variant": prompt.variant,
                          "program": prompt.program.detach().cpu()}
    torch.save(blob, directory / PRODUCT_FILE)
    if structure is not None:
        write_json(directory / STRUCTURE_FILE, structure)


def load_product(directory: Path) -> tuple[ImageClassifier, dict]:
    """Rebuild the classifier from a result directory (torchvision architecture [+ structure] + weights)."""
    directory = Path(directory)
    try:
        blob = torch.load(directory / PRODUCT_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read {directory / PRODUCT_FILE} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0]}); is the stage that wrote it finished?") from None
    backbone = build_backbone(blob["arch"], len(blob["classes"]), blob["res"], weights=None)
    structure_path = directory / STRUCTURE_FILE
    if structure_path.exists():
        backbone = rebuild(convert_attention(backbone), json.loads(structure_path.read_text()))
    backbone.load_state_dict(blob["model"])
    prompt = None
    if "prompt" in blob:
        p = blob["prompt"]
        prompt = PadPrompt(p["size"], p["pad"], p["variant"])
        prompt.program.data.copy_(p["program"])
    return ImageClassifier(backbone, prompt), blob

"""The classifier an unstructured search starts from (METHODS.md section 3, label mapping).

The dense network may come with a classifier of another size than the data's
class count (ImageNet weights on a 10-class set). `head` decides:

- `keep`: the sizes must agree; the classifier is used as it is.
- `map`: frequency label mapping: one pass of the prompted network (the
  prompt the search starts with, still zero) over the training images
  (center crop, no augmentation), then the classifier is cut to the rows the
  classes were mapped to.
- `new`: a freshly initialised classifier (`seed`), trained during the search
  together with its scores, since a frozen random head could not be searched.
- `auto` (default): `keep` when the sizes agree, `map` for torchvision
  (ImageNet) weights, `new` for any other checkpoint and for weights that
  hold no classifier.
"""
from __future__ import annotations

from torch import nn

from pruning.label_mapping import greedy_mapping, map_classifier, prediction_counts

from ..data import DataFiles
from ..models import (ImageClassifier, build_backbone, classifier_name, has_weights, is_torchvision_weights,
                      weights_num_classes)
from .context import StageContext
from .sources import dense_backbone


def resolve_head(head: str, outputs: int | None, classes: int, torchvision_weights: bool) -> str:
    """`outputs`: the stored classifier's size, None when the weights hold no classifier."""
    if outputs is None:
        if head in ("keep", "map"):
            raise ValueError(f"head={head}: the weights hold no classifier to {head}; use head=new (or auto)")
        return "new"
    if head == "auto":
        head = "keep" if outputs == classes else ("map" if torchvision_weights else "new")
    if head == "keep" and outputs != classes:
        raise ValueError(f"head=keep: the classifier has {outputs} outputs but the data has {classes} classes; "
                         f"use head=map or head=new")
    if head == "map" and outputs < classes:
        raise ValueError(f"head=map: cannot map {classes} classes onto a classifier with {outputs} outputs; "
                         f"use head=new")
    return head


def set_classifier(backbone: nn.Module, linear: nn.Linear) -> None:
    parent, _, child = classifier_name(backbone).rpartition(".")
    setattr(backbone.get_submodule(parent) if parent else backbone, child, linear)


def backbone_with_head(ctx: StageContext, files: DataFiles, prompt: nn.Module | None) -> tuple[nn.Module, str, dict]:
    """The dense backbone with a `files.num_classes`-way classifier, and how that head was made.

    `prompt`: the (still untrained) prompt the search starts with; label mapping runs through it.
    """
    cfg, classes = ctx.cfg, files.num_classes
    weights = cfg.model.weights
    if has_weights(weights):
        outputs = weights_num_classes(cfg.model.name, weights, cfg.data.res)
        head = resolve_head(cfg.head, outputs, classes, is_torchvision_weights(weights))
        # Built with the stored head when it is kept or mapped (build_backbone drops a head of another size).
        backbone = build_backbone(cfg.model.name, outputs if head in ("keep", "map") else classes,
                                  cfg.data.res, weights)
        source = f"model.weights={weights}"
    else:
        backbone, source = dense_backbone(ctx, files, "search")
        outputs = classes
        head = resolve_head(cfg.head, outputs, classes, False)
    info = {"head": head, "source_outputs": outputs, "label_mapping": None}
    old = backbone.get_submodule(classifier_name(backbone))
    if head == "map":
        model = ctx.engine.prepare_module(ImageClassifier(backbone, prompt))
        loader = ctx.val_loader(files, files.train)
        counts = ctx.engine.all_reduce_sum(prediction_counts(model, loader, classes, outputs, ctx.engine.device))
        mapping = greedy_mapping(counts)
        set_classifier(backbone, map_classifier(old, mapping))
        info["label_mapping"] = mapping
        hits = sum(int(counts[c, o]) for c, o in enumerate(mapping))
        ctx.say(f"search: frequency label mapping of {classes} classes onto {outputs} outputs: "
                f"{hits / max(1, int(counts.sum())):.1%} of the training images land on their class's output")
    elif head == "new":
        set_classifier(backbone, nn.Linear(old.in_features, classes, device=old.weight.device))
        ctx.say(f"search: a fresh {classes}-way classifier replaces the {outputs}-way one; it trains during search")
    return backbone, source, info


def classifier_from_state(state: dict) -> nn.Linear:
    """A Linear layer holding a saved classifier's weight and bias."""
    weight = state["weight"]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    linear.load_state_dict(state)
    return linear

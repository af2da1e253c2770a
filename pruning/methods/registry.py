"""The method interface and its registry: what a pruning method declares, and how stages find it.

A method is one class in one module of this package, decorated with `@register`. It says:

* `name`, `family` (`structured`: it keeps channels under `pruning.flops_ratio`; `unstructured`: it keeps
  weights at `pruning.density`) and `trains` (whether its search runs the `search.*` schedule);
* `settings`: its own config section (a dataclass of `setting(...)` fields), if it has options; the
  section is named after the method (`taylor.batches=8`), unless `section` names another;
* `search_prompt(cfg)` / `finetune_prompt(cfg)`: whether the search and the finetune carry a prompt;
* `search(job)`: the search itself, with the services a `SearchJob` offers (train with the search
  schedule, draw batches, all-reduce, log); it returns a `ChannelDecision` or a `MaskDecision`.

The stages (trainer/stages) ask the registry for `cfg.method.name` and never name a method.

Importing this package must stay cheap and torch-free (the launcher's --help and the config layer read
the registry): a method module imports torch and its helpers inside its functions only.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Protocol

STRUCTURED, UNSTRUCTURED = "structured", "unstructured"
FAMILIES = (STRUCTURED, UNSTRUCTURED)
FAMILY_BUDGET = {STRUCTURED: "pruning.flops_ratio", UNSTRUCTURED: "pruning.density"}


def setting(default, help: str):
    """A config field with its help line (mutable defaults go through default_factory). The config schema
    (trainer/config/schema.py) declares its fields with it too."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class SearchJob(Protocol):
    """What a method's search may use; the search stage provides it (trainer/stages/job.py)."""
    cfg: Any                      # the run's config (read `cfg[method.section]` for the method's settings)
    backbone: Any                 # the dense backbone, classifier mapped or fresh for the data (head=map/new)
    prompt: Any                   # the search's fresh prompt (PadPrompt) when search_prompt(cfg), else None
    head_name: str                # dotted name of the classifier Linear ("fc", "classifier.6", "heads.head")
    train_head: bool              # head=new: the classifier is fresh and must train with the search
    world_size: int
    device: Any                   # this process's device (the batches arrive on it)

    def fit(self, model, params, views=None): ...          # train with search.*; resumable; returns FitResult
    def prepare(self, module): ...                        # onto the device, wrapped for the processes
    def batches(self, count: int) -> Iterator: ...        # `count` training batches (images, labels) on device
    def all_reduce_sum(self, tensor): ...                 # summed over processes, in place
    def same_on_every_rank(self, tensors, what: str) -> list[str]: ...   # digests; raises if they differ
    def say(self, message: str) -> None: ...


@dataclass
class ChannelDecision:
    """A structured method's decision: the kept channel indices of every group of `graph`."""
    graph: Any
    flops: Any                    # pruning.flops_model.FlopsModel of the graph
    kept: list
    prompt: Any = None            # the searched prompt, when the search trained one
    state: dict | None = None     # saved as search.pt (finetune restores its "prompt" entry)
    fit: Any = None               # the search's FitResult, when it trained
    extra: dict = field(default_factory=dict)   # more summary entries


@dataclass
class MaskDecision:
    """An unstructured method's decision: one boolean mask per scored weight (state-dict names)."""
    masks: dict
    model: Any                    # the ImageClassifier searched (its prompt and head are published)
    threshold: str
    fit: Any = None
    extra: dict = field(default_factory=dict)


class Method:
    """Base of every method; subclasses set the class attributes and implement `search`."""
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    trains: ClassVar[bool] = False
    about: ClassVar[str] = ""                    # one line: what it does (--help, docs)
    settings: ClassVar[type | None] = None       # dataclass of its config section, if any
    section: ClassVar[str | None] = None         # the section's name (default: the method's name)
    choices: ClassVar[dict[str, tuple]] = {}     # setting -> allowed values

    @classmethod
    def section_name(cls) -> str | None:
        return (cls.section or cls.name) if cls.settings is not None else None

    def search_prompt(self, cfg) -> bool:
        """Whether the search stage carries a (trainable) prompt."""
        return False

    def finetune_prompt(self, cfg) -> bool:
        """Whether finetune trains with a prompt (the searched one when the search made one)."""
        return bool(cfg.finetune.prompt)

    def finetune_views(self, cfg, model, prompt) -> list | None:
        """The optimizer steps per finetune batch, as (name, context factory) pairs (None: one plain step)."""
        return None

    def note(self, cfg) -> str:
        """Text appended to the search's log line (an ablation, say)."""
        return ""

    def problems(self, cfg) -> list[str]:
        """Config errors in this method's own settings, one line each (checked for every run)."""
        return []

    def search(self, job: SearchJob) -> ChannelDecision | MaskDecision:
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method under its `name` (names are unique, families known)."""
    if not cls.name or cls.family not in FAMILIES:
        raise TypeError(f"{cls.__name__}: a method needs a name and a family in {FAMILIES}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are named {cls.name!r}: {_REGISTRY[cls.name].__module__}, {cls.__module__}")
    if cls.settings is not None and not dataclasses.is_dataclass(cls.settings):
        raise TypeError(f"{cls.__name__}.settings must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def method_names(family: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, m in _REGISTRY.items() if family is None or m.family == family)


def get_method(name: str) -> Method:
    """An instance of the registered method `name`; a one-line error lists the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown pruning method {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def family_of(name: str) -> str | None:
    return _REGISTRY[name].family if name in _REGISTRY else None


def sections() -> dict[str, type]:
    """Config section name -> settings dataclass, over every registered method (shared sections once)."""
    out: dict[str, type] = {}
    for cls in _REGISTRY.values():
        section = cls.section_name()
        if section is not None:
            if section in out and out[section] is not cls.settings:
                raise ValueError(f"config section {section!r} is declared twice with different settings")
            out[section] = cls.settings
    return out


def section_choices() -> dict[str, tuple]:
    """'<section>.<setting>' -> allowed values, over every registered method."""
    return {f"{cls.section_name()}.{key}": values for cls in _REGISTRY.values() for key, values in cls.choices.items()}


ViewList = list[tuple[str, Callable]]

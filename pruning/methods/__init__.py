"""The pruning methods: one module per method, registered by name (see registry.py for the interface).

Every module of this package is imported here, so dropping a new `<name>.py` with a `@register`ed class
into this folder is all it takes to add a method (docs/adding-a-method.md).
"""
from __future__ import annotations

import importlib
import pkgutil

from .registry import (FAMILIES, STRUCTURED, UNSTRUCTURED, ChannelDecision, MaskDecision, Method, SearchJob,
                       family_of, get_method, method_names, register, registered, section_choices, sections,
                       setting)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "STRUCTURED", "UNSTRUCTURED", "ChannelDecision", "MaskDecision", "Method", "SearchJob",
           "family_of", "get_method", "method_names", "register", "registered", "section_choices", "sections",
           "setting"]

"""The model registry itself: families (a name pattern and a builder) register here, and
``kdlab.models`` builds, lists and describes them. A module of its own so that the family
modules import it without importing the package that imports them."""

from __future__ import annotations

import re
from typing import Callable

import torch.nn as nn

_FAMILIES: dict[str, tuple[re.Pattern, Callable[..., nn.Module], str, list[str]]] = {}


def register_family(pattern: str, example_names: list[str], help: str):
    """Register a builder ``fn(match, num_classes, input_shape) -> nn.Module``."""

    def wrap(fn):
        _FAMILIES[pattern] = (re.compile(pattern + r"\Z"), fn, help, example_names)
        return fn

    return wrap


def positive_sizes(name: str, **sizes: int) -> None:
    """Builders' check: every named size is at least 1."""
    for what, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name}: {what} must be at least 1, got {value}")

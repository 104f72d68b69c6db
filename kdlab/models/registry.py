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


def suggest_model(name: str) -> str:
    """" (did you mean X?)" for an unknown model name: a family's example close to it (``cnn1d``
    → cnn1d-8, ``resnet-18`` → resnet-20), or timm's spelling of an ImageNet name
    (``resnet18`` → timm:resnet18); "" when nothing is close."""
    import difflib

    examples = [example for *_, names in _FAMILIES.values() for example in names if not example.startswith("timm:")]
    close = [example for example in examples if example.startswith(name + "-")][:2]  # cnn1d → cnn1d-8
    if not close:
        close = difflib.get_close_matches(name, examples, n=1, cutoff=0.6)
        if re.fullmatch(r"[a-z]+[a-z0-9_]*\d[a-z0-9_]*", name):
            close = [f"timm:{name}"] + close  # (an ImageNet architecture's timm name, e.g. resnet18)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


"""The model registry itself: families (a name pattern and a builder) register here, and
``kdlab.models`` builds, lists and describes them. A module of its own so that the family
modules import it without importing the package that imports them."""

from __future__ import annotations

import re
from typing import Callable

import torch.nn as nn

_FAMILIES: dict[str, tuple[re.Pattern, Callable[..., nn.Module], str, list[str]]] = {}


def register_family(pattern: str, example_names: list[str], help: str):
    """Register a model family: ``pattern`` a regular expression for its names (``r"mlp-(\\d+)"``),
    ``example_names`` names ``kdlab models`` shows, ``help`` one line. The builder is called as
    ``fn(match, num_classes=K, in_channels=C, input_shape=S)``: ``match`` the name's regex match,
    ``input_shape`` one sample's shape — (C, H, W) for images, (C, L) for MNIST-1D, () for token
    sequences — or None when the caller does not know it (``build_model(name, K)`` without it,
    e.g. counting parameters; then use ``in_channels`` and a default size). Return an
    ``nn.Module`` whose forward takes a batch and returns logits (B, K); accept
    ``return_features=True`` to also return the penultimate features (the analysis uses them),
    and give it ``stage_taps()`` for feature distillation's default taps."""

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


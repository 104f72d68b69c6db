"""A tiny model registry (timm-style): ``build_model(name, num_classes)``, ``list_models()``.

Names carry their sizes: ``wrn-16-2``, ``resnet-56``, ``mlp-1200-1200``, ``cnn1d-32``.
Each registered *family* is a regex and a builder. Every model's ``forward(x,
return_features=False)`` returns logits, or ``(logits, features)`` where features are
the penultimate activations (the input of the last linear layer).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .registry import _FAMILIES, positive_sizes, register_family  # noqa: F401 (the registry's API, here too)

def list_models() -> list[str]:
    """Example names of every family (each family accepts any size its pattern allows)."""
    return [name for _, _, _, examples in _FAMILIES.values() for name in examples]


def describe_models() -> list[tuple[str, str]]:
    return [(pattern, help) for pattern, (_, _, help, _) in _FAMILIES.items()]


def build_model(
    name: str, num_classes: int, in_channels: int = 3, input_shape: Sequence[int] | None = None
) -> nn.Module:
    """Build a model by name. ``input_shape`` is one sample's shape (C, H, W) or (C, L);
    when given it sets ``in_channels``; MLPs need it to size their first layer
    (default (in_channels, 28, 28))."""
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
        in_channels = input_shape[0] if input_shape else in_channels  # () for token sequences
    for regex, fn, _, _ in _FAMILIES.values():
        match = regex.match(name)
        if match:
            return fn(match, num_classes=num_classes, in_channels=in_channels, input_shape=input_shape)
    from .registry import suggest_model

    raise ValueError(f"unknown model {name!r}{suggest_model(name)}; known families: {', '.join(_FAMILIES)}")


CHECK_ON_CPU_PARAMS = 5_000_000  # 20 MB of float32: allocated, not initialised


def check_model(name: str, num_classes: int, input_shape: Sequence[int]) -> int:
    """Build ``name`` on the meta device (shapes only: no memory, no compute) and run a
    forward pass on a batch of two inputs of ``input_shape``: on the CPU with uninitialised
    weights for models up to CHECK_ON_CPU_PARAMS parameters (a meta forward imports
    torch's decompositions and dynamo, ~3 s, more than a small model's whole check), on
    the meta device above. Returns the parameter count; raises ValueError with a one-line
    reason for a size the family cannot build or an input the model cannot take."""
    input_shape = tuple(int(s) for s in input_shape)
    try:
        with torch.device("meta"):
            model = build_model(name, num_classes, input_shape=input_shape)
    except ValueError as err:
        raise ValueError(str(err).splitlines()[0]) from None
    if hasattr(model, "beam_search"):
        raise ValueError(f"{name} is a translation model (source and target token sequences), not a classifier")
    num_params = count_parameters(model)
    device = "cpu" if num_params <= CHECK_ON_CPU_PARAMS else "meta"
    if device == "cpu":
        model = model.to_empty(device="cpu")
    try:
        with torch.device(device), torch.no_grad():
            out = model(torch.zeros((2,) + input_shape))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name} cannot take inputs of shape {input_shape} ({reason})") from None
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"{name} gives outputs of shape {tuple(out.shape)[1:]} for inputs of shape {input_shape}, "
                         f"not {num_classes} logits")
    return num_params


def classifier_key(model: nn.Module) -> str:
    """State-dict prefix of the last linear layer (``fc`` for kdlab's own models)."""
    return getattr(model, "classifier_name", "fc")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from . import alexnet, cnn1d, mlp, resnet, timm_family, transformer, wrn  # noqa: E402,F401  (registers the families)

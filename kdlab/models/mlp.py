"""Fully connected ReLU nets ``mlp-H1-H2-...`` (Müller et al. A.5: 784-1200-1200-10
teacher, 784-800-800-10 student). The input is flattened. ``mlp-H1-...-bn`` puts batch
norm between each hidden linear layer (then without bias) and its ReLU, as the conv-BN-ReLU
of CNNs: the quick stand-ins for Kim's WRNs, which have batch norm (docs/reproductions.md).
``mlp-H1-...-ln`` puts layer norm in the same place: normalised per example, so an example's
logits do not depend on the rest of its batch (the batch-norm study in docs/reproductions.md)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .registry import positive_sizes, register_family
from .taps import StageTap, relu_stages


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, norm: str | None = None):
        super().__init__()
        if norm not in (None, "bn", "ln"):
            raise ValueError(f"MLP norm must be None, 'bn' or 'ln', not {norm!r}")
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            if norm:
                layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h) if norm == "bn" else nn.LayerNorm(h),
                           nn.ReLU(inplace=True)]
            else:
                layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.feature_dim = width

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.hidden(x)
        logits = self.fc(features)
        return (logits, features) if return_features else logits

    def stage_taps(self) -> list[StageTap]:
        """Each hidden layer after its ReLU; before the ReLU: the linear layer's output, or its
        norm's (batch or layer norm) when the model has one."""
        return relu_stages(self.hidden, "hidden.", (nn.Linear, nn.BatchNorm1d, nn.LayerNorm))


@register_family(r"mlp((?:-\d+)+)(?:-(bn|ln))?", ["mlp-1200-1200", "mlp-800-800", "mlp-64-64-bn"],
                 "fully connected ReLU net with the given hidden widths (Müller et al. A.5); -bn: batch norm, "
                 "-ln: layer norm after each hidden linear layer")
def _build(match, num_classes, in_channels, input_shape):
    shape = input_shape if input_shape is not None else (in_channels, 28, 28)
    hidden = [int(h) for h in match[1].strip("-").split("-")]
    positive_sizes(match[0], **{f"hidden width {i + 1}": h for i, h in enumerate(hidden)})
    return MLP(math.prod(shape), hidden, num_classes, norm=match[2])

"""A small 1-D CNN for MNIST-1D (Greydanus 2020): three conv-BN-ReLU layers of width W
(``cnn1d-W``), the last two with stride 2, adaptive average pooling to 4 positions,
a hidden linear layer of 4·W units (the penultimate features), then the classifier."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import positive_sizes, register_family
from .taps import StageTap, relu_stages


class CNN1d(nn.Module):
    def __init__(self, width: int, num_classes: int, in_channels: int = 1):
        super().__init__()

        def conv(cin, cout, stride):
            return [nn.Conv1d(cin, cout, 5, stride, 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *conv(in_channels, width, 1), *conv(width, width, 2), *conv(width, width, 2),
            nn.AdaptiveAvgPool1d(4), nn.Flatten(),
            nn.Linear(4 * width, 4 * width), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if x.dim() == 2:  # (B, L) -> (B, 1, L)
            x = x.unsqueeze(1)
        features = self.body(x)
        logits = self.fc(features)
        return (logits, features) if return_features else logits

    def stage_taps(self) -> list[StageTap]:
        """The three conv-BN-ReLU layers (their ReLU's output; before it, the BN's output)."""
        return relu_stages(self.body, "body.", (nn.BatchNorm1d,))


@register_family(r"cnn1d-(\d+)", ["cnn1d-8", "cnn1d-32"], "1-D CNN of width W for MNIST-1D")
def _build(match, num_classes, in_channels, input_shape):
    positive_sizes(match[0], width=int(match[1]))
    return CNN1d(int(match[1]), num_classes, in_channels)

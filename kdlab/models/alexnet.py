"""The TensorFlow CIFAR-10 tutorial network Müller et al. (A.1) call AlexNet:
conv5×5(64) → maxpool 3/2 → LRN → conv5×5(64) → LRN → maxpool 3/2 → fc 384 → fc 192 → fc K.
The tutorial trains on 24×24 crops; here the flatten size follows the input size."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_family
from .taps import StageTap, relu_stages


class AlexNetCifar(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(inplace=True),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
            nn.MaxPool2d(3, 2, padding=1),
        )
        side = image_size
        for _ in range(2):
            side = (side + 2 - 3) // 2 + 1
        self.hidden = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 384), nn.ReLU(inplace=True),
            nn.Linear(384, 192), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(192, num_classes)
        self.feature_dim = 192

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.hidden(self.features(x))
        logits = self.fc(features)
        return (logits, features) if return_features else logits

    def stage_taps(self) -> list[StageTap]:
        """The two conv layers (their ReLU's output; before it, the conv's: no batch norm)."""
        return relu_stages(self.features, "features.", (nn.Conv2d,))


@register_family(r"alexnet-cifar", ["alexnet-cifar"],
                 "TensorFlow-tutorial CIFAR-10 'AlexNet' (Müller et al. A.1)")
def _build(match, num_classes, in_channels, input_shape):
    size = input_shape[-1] if input_shape is not None else 32
    return AlexNetCifar(num_classes, in_channels, size)

"""CIFAR ResNet-n (He et al. 2016, §4.2): depth n = 6m + 2, 16/32/64 channels, identity
shortcuts with zero-padded channels (option A). ResNet-56 is Müller et al.'s CIFAR-100
model."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_family
from .taps import StageTap


class _Basic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes
        self.relu = nn.ReLU()  # the last ReLU, a module so that its input (the pre-ReLU sum) can be tapped

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            # option A: subsample spatially, zero-pad the new channels (no parameters)
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6m+2 (20, 32, 44, 56, 110, ...), got {depth}")
        m = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(m):
                layers.append(_Basic(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        self.feature_dim = 64
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        features = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits

    def stage_taps(self) -> list[StageTap]:
        """The three stages' outputs (their last block's, after its ReLU); the pre-ReLU feature is
        the input of that block's last ReLU (bn2's output plus the shortcut), and its norm bn2 (Heo
        et al.'s OFD code, get_bn_before_relu)."""
        m = len(self.layers) // 3
        ends = [f"layers.{(g + 1) * m - 1}" for g in range(3)]
        return [StageTap(end, f"{end}.relu:in", f"{end}.bn2") for end in ends]


@register_family(r"resnet-(\d+)", ["resnet-20", "resnet-56", "resnet-110"],
                 "CIFAR ResNet-depth with option-A shortcuts, depth = 6m+2 (Müller et al.)")
def _build(match, num_classes, in_channels, input_shape):
    return CifarResNet(int(match[1]), num_classes, in_channels)

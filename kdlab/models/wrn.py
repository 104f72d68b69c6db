"""Wide ResNet WRN-d-k, pre-activation (Zagoruyko & Komodakis 2016), as used by Kim et
al. 2021 and the KD codebases they follow. Depth d = 6n + 4."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import positive_sizes, register_family
from .taps import StageTap


class _Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers = []
        for stage, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                layers.append(_Block(widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1], stride if i == 0 else 1))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        features = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits

    def stage_taps(self) -> list[StageTap]:
        """The three groups' outputs (pre-activation sums, as Zagoruyko's AT code takes them);
        before each group's ReLU is the next group's first bn1 (the final bn for the last), whose
        output is the pre-ReLU feature (Heo et al.'s OFD code, get_bn_before_relu)."""
        n = len(self.blocks) // 3
        norms = [f"blocks.{(g + 1) * n}.bn1" for g in range(2)] + ["bn"]
        return [StageTap(f"blocks.{(g + 1) * n - 1}", norm, norm) for g, norm in enumerate(norms)]


@register_family(r"wrn-(\d+)-(\d+)", ["wrn-16-2", "wrn-16-4", "wrn-28-2", "wrn-28-4", "wrn-40-6"],
                 "pre-activation Wide ResNet WRN-depth-width, depth = 6n+4 (Kim et al.)")
def _build(match, num_classes, in_channels, input_shape):
    positive_sizes(match[0], width=int(match[2]))
    return WideResNet(int(match[1]), int(match[2]), num_classes, in_channels)

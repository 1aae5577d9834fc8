"""Pre-activation ResNet for CIFAR, as used for PreResNet-29 in the EigenDamage experiments.

Choice (matching the EigenDamage code): depth 9n+2 built from *bottleneck* blocks of three
convolutions (1x1, 3x3, 1x1) with expansion 1, each preceded by BatchNorm and ReLU; stage widths
(w, 2w, 4w) with w = 64, so PreResNet-29 has 3 bottlenecks per stage. When a block changes the
shape, the shortcut is a 1x1 convolution applied to the block's raw input (no BatchNorm, as
usual for pre-activation networks). The stem is a plain 3x3 convolution; the head is
BatchNorm, ReLU, global average pooling and a Linear layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_conv_bn


class PreActBottleneck(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, kernel_size=1, bias=False)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride,
                                      bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        residual = x if self.shortcut is None else self.shortcut(x)
        return out + residual


class PreResNet(nn.Module):
    def __init__(self, depth: int = 29, num_classes: int = 10, width: int = 64,
                 in_channels: int = 3):
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"PreResNet depth must be 9n+2 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"PreResNet width must be a positive integer, got {width}")
        blocks = (depth - 2) // 9
        widths = (width, 2 * width, 4 * width)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_stage(width, widths[0], blocks, stride=1)
        self.layer2 = self._make_stage(widths[0], widths[1], blocks, stride=2)
        self.layer3 = self._make_stage(widths[1], widths[2], blocks, stride=2)
        self.bn = nn.BatchNorm2d(widths[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self.reset_parameters()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [PreActBottleneck(in_planes, planes, stride)]
        layers += [PreActBottleneck(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        init_conv_bn(self, linear=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.pool(F.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))

"""CIFAR ResNet (He et al. 2016, section 4.2): depth 6n+2, three stages of n basic blocks.

Stage widths are (w, 2w, 4w). ResNet-20/56 use w = 16; the EigenDamage / OBA papers' ResNet-32
is the 4x-wide variant, w = 64 (7.4 M parameters with 10 classes). When a block changes the
shape, its shortcut is a 1x1 convolution plus BatchNorm (option B), so the block's output
channels are shared by a real layer that torch-pruning can couple and prune.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_conv_bn


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # None rather than nn.Identity: an identity module has no operation of its own and
        # would only blur the module-to-operation map that graph tracers build.
        self.shortcut: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16,
                 in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"ResNet width must be a positive integer, got {width}")
        blocks = (depth - 2) // 6
        widths = (width, 2 * width, 4 * width)
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_stage(width, widths[0], blocks, stride=1)
        self.layer2 = self._make_stage(widths[0], widths[1], blocks, stride=2)
        self.layer3 = self._make_stage(widths[1], widths[2], blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self.reset_parameters()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        init_conv_bn(self, linear="he")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.pool(x)
        return self.fc(torch.flatten(x, 1))

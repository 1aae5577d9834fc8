"""CIFAR VGG with BatchNorm.

The layout follows the EigenDamage / network-slimming CIFAR VGG: 3x3 convolutions (no bias, each
followed by BatchNorm and ReLU), four 2x2 max-pools, and a head of global average pooling plus a
single Linear(512, num_classes). At 32x32 input the last feature map is 2x2, so the global pool
equals the original AvgPool2d(2); adaptive pooling lets other resolutions work too.
VGG-19 has 20.04 M parameters with 10 classes.
"""
from __future__ import annotations

from typing import List, Union

import torch
import torch.nn as nn

from .init import init_conv_bn

POOL = "M"

VGG_LAYOUTS = {
    11: [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    13: [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    16: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512],
    19: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512],
}


def make_features(layout: List[Union[int, str]], in_channels: int = 3) -> nn.Sequential:
    layers: List[nn.Module] = []
    channels = in_channels
    for item in layout:
        if item == POOL:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False),
                       nn.BatchNorm2d(item),
                       nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, depth: int = 19, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth not in VGG_LAYOUTS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_LAYOUTS)}, got {depth}")
        layout = VGG_LAYOUTS[depth]
        self.features = make_features(layout, in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(layout[-1], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_conv_bn(self, linear=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

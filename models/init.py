"""Weight initialisation shared by the CIFAR networks."""
from typing import Optional, Union

import torch.nn as nn


def init_conv_bn(model: nn.Module, linear: Optional[Union[str, float]] = "he") -> None:
    """He (fan-out) init for convolutions and BatchNorm at identity. Linear layers: "he" as the
    convolutions, a float for N(0, std²) with zero bias, None to keep PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) or (isinstance(module, nn.Linear) and linear == "he"):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear is not None:
            nn.init.normal_(module.weight, 0.0, float(linear))
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

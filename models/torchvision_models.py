"""ImageNet networks from torchvision (ResNet-50, ViT-B/16) with named or local weights.

Named weights (e.g. "IMAGENET1K_V1" or "ResNet50_Weights.IMAGENET1K_V1") are read from the torch
hub cache only; nothing is downloaded unless `download=True` is asked for, so an offline machine
fails at once with a message that says where the file is expected.
"""
from __future__ import annotations

import os
from typing import Callable, Dict
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from . import ModelError

TORCHVISION_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "resnet50": torchvision.models.resnet50,
    "vit_b_16": torchvision.models.vit_b_16,
}
IMAGENET_CLASSES = 1000


def resolve_weights(model_name: str, weights_name: str):
    """The torchvision weights enum member called `weights_name` for `model_name`."""
    enum = torchvision.models.get_model_weights(model_name)
    member = weights_name
    if "." in weights_name:
        prefix, member = weights_name.rsplit(".", 1)
        if prefix.split(".")[-1] != enum.__name__:
            raise ModelError(f"weights '{weights_name}' do not belong to {model_name}; "
                             f"use {enum.__name__}.<name> or a local file path")
    try:
        return enum[member]
    except KeyError:
        names = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ModelError(f"unknown weights '{weights_name}' for {model_name}; choose one of: "
                         f"{names}, or pass a local weights file path") from None


def cached_weights_path(weights) -> str:
    """Where torch.hub keeps the file of `weights` (it may not exist)."""
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def load_named_weights(model_name: str, weights_name: str, download: bool = False) -> dict:
    weights = resolve_weights(model_name, weights_name)
    path = cached_weights_path(weights)
    if not os.path.isfile(path):
        if not download:
            raise ModelError(
                f"weights {type(weights).__name__}.{weights.name} for {model_name} are not cached "
                f"(expected {path}); copy the file there, or pass a local weights file path instead")
        try:
            return weights.get_state_dict(progress=True)
        except Exception as err:  # no network, proxy, disk full: one clear line either way
            raise ModelError(f"could not download {weights.url} to {path} ({err}); "
                             f"pass a local weights file path instead") from None
    return torch.load(path, map_location="cpu", weights_only=True)


def build_torchvision_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    if name not in TORCHVISION_BUILDERS:
        raise ModelError(f"unknown torchvision model '{name}'; choose one of: "
                         f"{', '.join(TORCHVISION_BUILDERS)}")
    try:
        return TORCHVISION_BUILDERS[name](weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ModelError(f"bad option for {name}: {err}") from None

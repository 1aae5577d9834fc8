"""Every torchvision classification network, with named or local weights.

The names are torchvision's own (`torchvision.models.list_models(module=torchvision.models)`),
with one exception: `vgg11`, `vgg13`, `vgg16` and `vgg19` are this project's CIFAR VGGs (the
published interface), so torchvision's plain VGGs are reached as `tv_vgg11` ... `tv_vgg19`. Any
torchvision name may be written with the `tv_` prefix; the BatchNorm VGGs (`vgg16_bn`) are
torchvision's under both spellings.

Named weights (e.g. "IMAGENET1K_V1" or "ResNet50_Weights.IMAGENET1K_V1") are read from the torch
hub cache only; nothing is downloaded unless `download=True` is asked for, so an offline machine
fails at once with a message that says where the file is expected.

Per-family details handled here:
* GoogLeNet / Inception v3 are built without their auxiliary classifiers (they only add a
  training-time loss and would make the output a tuple); with named weights the auxiliary heads
  are loaded (the file holds them) and then dropped, and the input transform the weights were
  trained with is switched on, as torchvision's own builders do.
* ViT / MaxViT weights fix the input size the network is built for (position embedding, grid).
"""
from __future__ import annotations

import os
from typing import Callable, Dict
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from . import ModelError

TV_PREFIX = "tv_"
# Names this project already gives to its own CIFAR networks.
CIFAR_NAMES = ("vgg11", "vgg13", "vgg16", "vgg19")
AUXILIARY_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
IMAGENET_CLASSES = 1000


def _classification_builders() -> Dict[str, Callable[..., nn.Module]]:
    names = torchvision.models.list_models(module=torchvision.models)
    return {(TV_PREFIX + n if n in CIFAR_NAMES else n): torchvision.models.get_model_builder(n)
            for n in names}


# Our name -> torchvision builder. Ordered as torchvision lists them.
TORCHVISION_BUILDERS: Dict[str, Callable[..., nn.Module]] = _classification_builders()


def torchvision_name(name: str) -> str:
    """torchvision's name of our model `name` ('tv_vgg16' -> 'vgg16'), or '' if not one of them."""
    if name in TORCHVISION_BUILDERS:
        return name[len(TV_PREFIX):] if name.startswith(TV_PREFIX) else name
    if name.startswith(TV_PREFIX) and name[len(TV_PREFIX):] in TORCHVISION_BUILDERS:
        return name[len(TV_PREFIX):]
    return ""


def is_torchvision_model(name: str) -> bool:
    return bool(torchvision_name(name))


def resolve_weights(model_name: str, weights_name: str):
    """The torchvision weights enum member called `weights_name` for `model_name`."""
    enum = torchvision.models.get_model_weights(torchvision_name(model_name) or model_name)
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


def _builder_options(name: str, weights_name=None) -> dict:
    """Constructor options a family needs: without weights, no auxiliary heads; with named
    weights, whatever the weights were trained with (as torchvision's builders set them)."""
    tv = torchvision_name(name)
    if weights_name is None:
        if tv in AUXILIARY_HEADS:
            return {"aux_logits": False, "init_weights": True}
        return {}
    weights = resolve_weights(name, weights_name)
    if tv in AUXILIARY_HEADS:
        return {"aux_logits": True, "init_weights": False, "transform_input": True}
    if tv.startswith("vit_"):
        return {"image_size": weights.meta["min_size"][0]}
    if tv.startswith("maxvit"):
        return {"input_size": weights.meta["min_size"]}
    return {}


def drop_auxiliary_heads(model: nn.Module, name: str) -> nn.Module:
    """Remove GoogLeNet's / Inception v3's auxiliary classifiers (their forward then returns the
    logits alone in training mode too)."""
    heads = AUXILIARY_HEADS.get(torchvision_name(name), ())
    if heads and getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in heads:
            setattr(model, attr, None)
    return model


def auxiliary_prefixes(name: str) -> tuple:
    """State-dict key prefixes of the auxiliary heads a weights file of `name` may carry."""
    return tuple(f"{attr}." for attr in AUXILIARY_HEADS.get(torchvision_name(name), ()))


def build_torchvision_model(name: str, num_classes: int, weights_name=None, **kwargs) -> nn.Module:
    """torchvision network `name` with random weights and a `num_classes`-way classifier, built as
    named weights `weights_name` (when given) need it; `kwargs` go to the constructor."""
    tv = torchvision_name(name)
    if not tv:
        raise ModelError(f"unknown torchvision model '{name}'; choose one of: "
                         f"{', '.join(TORCHVISION_BUILDERS)}")
    options = {**_builder_options(name, weights_name), **kwargs}
    try:
        return torchvision.models.get_model_builder(tv)(weights=None, num_classes=num_classes,
                                                        **options)
    except (TypeError, ValueError, AssertionError) as err:
        raise ModelError(f"bad option for {name}: {err}") from None

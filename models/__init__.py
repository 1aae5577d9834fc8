"""Network definitions and the one place that turns a model name into a network.

    get_model("vgg19", 10)                      CIFAR VGG-19 (BatchNorm)
    get_model("resnet56", 100)                  CIFAR ResNet, depth 6n+2 (width 16; resnet32: 64)
    get_model("preresnet29", 10)                pre-activation bottleneck ResNet, depth 9n+2
    get_model("resnet50", 1000, weights="IMAGENET1K_V1")   torchvision networks
    get_model("vit_b_16", 10, weights="/path/to/file.pth")  local state_dict / checkpoint
    get_model("tv_vgg16", 1000)                 torchvision's VGG-16 (vgg16 is the CIFAR one)

Every torchvision classification model is available under its torchvision name
(models/torchvision_models.py); `vgg11/13/16/19` stay the CIFAR VGGs of this project.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Mapping, Optional, Tuple

import torch
import torch.nn as nn


class ModelError(ValueError):
    """Bad model name, option or weights; the message is meant for the user, one line."""


# Imported after ModelError: torchvision_models raises it.
from .preresnet import PreResNet  # noqa: E402
from .resnet import CifarResNet  # noqa: E402
from .torchvision_models import (TORCHVISION_BUILDERS, IMAGENET_CLASSES,  # noqa: E402
                                 auxiliary_prefixes, build_torchvision_model,
                                 drop_auxiliary_heads, is_torchvision_model, load_named_weights)
from .vgg import VGG, VGG_LAYOUTS  # noqa: E402

__all__ = ["ModelError", "get_model", "available_models", "get_classifier",
           "replace_classifier", "load_weights_file"]

# resnet32 in the EigenDamage / OBA experiments is the 4x-wide CIFAR ResNet.
WIDE_RESNET_DEPTHS = {32: 64}
CIFAR_RESNET_WIDTH = 16
CLASSIFIER_PATHS = ("classifier", "fc", "linear", "heads.head", "head")


def available_models() -> Tuple[str, ...]:
    vggs = tuple(f"vgg{d}" for d in sorted(VGG_LAYOUTS))
    return vggs + ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                   "preresnet29") + tuple(TORCHVISION_BUILDERS)


def _unknown(name: str) -> ModelError:
    close = difflib.get_close_matches(name.strip().lower(), available_models(), n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ModelError(f"unknown model '{name}'; {hint}choose one of: {', '.join(available_models())} "
                      f"(or resnet<6n+2>, preresnet<9n+2>)")


def _build_cifar(name: str, num_classes: int, kwargs: dict) -> Optional[nn.Module]:
    """The CIFAR network called `name`, or None when the name is not a CIFAR family name."""
    match = re.fullmatch(r"(vgg|cifar_resnet|resnet|preresnet)(\d+)", name)
    if match is None:
        return None
    family, depth = match.group(1), int(match.group(2))
    try:
        if family == "vgg":
            if depth not in VGG_LAYOUTS:
                raise _unknown(name)
            return VGG(depth, num_classes, **kwargs)
        if family in ("resnet", "cifar_resnet"):
            if depth < 8 or (depth - 2) % 6:
                raise _unknown(name)
            kwargs.setdefault("width", WIDE_RESNET_DEPTHS.get(depth, CIFAR_RESNET_WIDTH))
            return CifarResNet(depth, num_classes, **kwargs)
        if depth < 11 or (depth - 2) % 9:
            raise _unknown(name)
        return PreResNet(depth, num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"bad option for {name}: {err}") from None


def get_model(name: str, num_classes: int, weights: Optional[str] = None,
              download: bool = False, **kwargs) -> nn.Module:
    """Build network `name` with a `num_classes`-way classifier.

    weights: None (random init), a torchvision weights name (torchvision models only; read from
    the torch hub cache, downloaded only when `download` is true) or a local file holding a
    state_dict or a checkpoint dict with 'state_dict' / 'model'. When the weights' classifier
    has a different number of classes, the classifier is replaced by a freshly initialised one.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    key = name.strip().lower()
    local_file = weights is not None and _looks_like_path(weights)

    if is_torchvision_model(key):
        if weights is None or local_file:
            model = build_torchvision_model(key, num_classes, **kwargs)
        else:
            state = load_named_weights(key, weights, download=download)
            model = build_torchvision_model(key, IMAGENET_CLASSES, weights_name=weights, **kwargs)
            model.load_state_dict(state)
            drop_auxiliary_heads(model, key)
            if num_classes != IMAGENET_CLASSES:
                replace_classifier(model, num_classes)
    else:
        model = _build_cifar(key, num_classes, dict(kwargs))
        if model is None:
            raise _unknown(name)
        if weights is not None and not local_file:
            raise ModelError(f"named weights '{weights}' exist only for torchvision models; "
                             f"pass a local file path for {name}")
    if local_file:
        load_weights_file(model, weights, ignore_prefixes=auxiliary_prefixes(key))
    return model


def _looks_like_path(weights: str) -> bool:
    return os.path.exists(weights) or os.sep in weights or weights.endswith((".pth", ".pt", ".tar"))


# ----------------------------------------------------------------------------- classifier

def _classifier_path(model: nn.Module) -> str:
    """Where the classifier lives: a known attribute, else the last Linear layer, else (networks
    whose logits come from a 1x1 convolution, e.g. SqueezeNet) the last convolution."""
    modules = dict(model.named_modules())
    for path in CLASSIFIER_PATHS:
        if isinstance(modules.get(path), nn.Linear):
            return path
    for kind in (nn.Linear, nn.modules.conv._ConvNd):
        found = [path for path, module in modules.items() if isinstance(module, kind)]
        if found:
            return found[-1]
    raise ModelError(f"{type(model).__name__} has no Linear or convolution classifier layer")


def get_classifier(model: nn.Module) -> nn.Module:
    """The final classification layer (kept whole by every pruner)."""
    return model.get_submodule(_classifier_path(model))


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the classifier for a fresh layer with `num_classes` outputs; returns the new layer."""
    path = _classifier_path(model)
    old = model.get_submodule(path)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = type(old)(old.in_channels, num_classes, old.kernel_size, stride=old.stride,
                        padding=old.padding, dilation=old.dilation, bias=old.bias is not None)
        nn.init.normal_(new.weight, std=0.01)  # as torchvision starts SqueezeNet's final conv
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    return new


# ----------------------------------------------------------------------------- weight files

def _read_file(path: str):
    """Tensors and plain data only (weights_only=True): a file that would run code is refused."""
    from utils.checkpoint import CheckpointError, read_tensors_file
    try:
        return read_tensors_file(path)
    except CheckpointError as err:
        raise ModelError(str(err)) from None


def _state_dict_from(obj, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj:
                return _state_dict_from(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    raise ModelError(f"{path} holds no state_dict (expected a state_dict or a checkpoint dict "
                     f"with 'state_dict' or 'model')")


def load_weights_file(model: nn.Module, path: str, ignore_prefixes: tuple = ()) -> nn.Module:
    """Load a local state_dict / checkpoint into `model`.

    A 'module.' prefix (DistributedDataParallel) is removed. Entries under `ignore_prefixes`
    that the model lacks (auxiliary heads in a torchvision GoogLeNet / Inception file) are
    dropped. Classifier entries whose shape differs (e.g. 1000 ImageNet classes into a 10-class
    model) are skipped, keeping the fresh classifier; any other mismatch is an error.
    """
    if not os.path.isfile(path):
        raise ModelError(f"weights file {path} does not exist; check the path")
    state = {re.sub(r"^module\.", "", k): v for k, v in _state_dict_from(_read_file(path), path).items()}
    own = model.state_dict()
    if ignore_prefixes:
        state = {k: v for k, v in state.items() if k in own or not k.startswith(ignore_prefixes)}
    head = _classifier_path(model) + "."
    head_keys = [k for k in own if k.startswith(head)]
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        state.update({k: own[k] for k in head_keys})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                  f"model has {tuple(own[wrong[0]].shape)}")
        raise ModelError(f"weights file {path} does not fit {type(model).__name__}: {detail}; "
                         f"is it a checkpoint of a different (e.g. pruned) network?")
    model.load_state_dict(state)
    return model

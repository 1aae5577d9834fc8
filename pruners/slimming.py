"""Network Slimming (Liu et al., 2017): train with an L1 penalty on BatchNorm scales, then
remove the channels whose scale |γ| is smallest.

The criterion needs no data: a channel's score is |γ| of the BatchNorm that normalises it
(folded over the coupled group by the structured driver, which reads norm-layer scores when
Method.norm_layers is set). `bn_l1_penalty` is the term the training engine adds to the loss
as λ · penalty when --sparsity_l1 λ > 0.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import Batch, Method, ScoreDict, model_device, register


def batchnorm_scales(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """(name of γ, γ) for every BatchNorm (1d/2d/3d, SyncBatchNorm) with affine parameters."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.weight is not None:
            yield (f"{name}.weight" if name else "weight"), module.weight


def slimming_scores(model: nn.Module, batches: Iterable[Batch] = (), loss_fn: Callable = None
                    ) -> ScoreDict:
    """{BatchNorm weight name: |γ|}; `batches` and `loss_fn` are not used."""
    return {name: gamma.detach().abs().clone() for name, gamma in batchnorm_scales(model)}


def bn_l1_penalty(model: nn.Module) -> torch.Tensor:
    """Σ |γ| over all BatchNorm scales, differentiable (0 when the model has none)."""
    terms = [gamma.abs().sum() for _, gamma in batchnorm_scales(model)]
    if not terms:
        return torch.zeros((), device=model_device(model))
    return torch.stack(terms).sum()


SLIM = register(Method("Slim", slimming_scores, in_channels=False, norm_layers=True,
                       needs_data=False,
                       description="Network Slimming: |γ| of BatchNorm scales"))

"""First-order and data-free criteria: Weight (magnitude), Taylor and Random."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import Method, average_batch_scores, model_device, preserved_state, register


def _scored_parameters(model: nn.Module):
    """Conv / linear weights and biases, and any other parameter outside normalisation layers."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    skip = set()
    for m in model.modules():
        if isinstance(m, norm_types):
            skip.update(id(p) for p in m.parameters(recurse=False))
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]


def _weight_scores(model, batches, loss_fn):
    # Squared magnitude: its per-channel sum is the squared L2 norm of the channel. Normalisation
    # scales are included: behind BatchNorm a filter's own norm says nothing (BN undoes its scale).
    return {n: p.detach() ** 2 for n, p in model.named_parameters() if p.requires_grad}


def _taylor_scores(model, batches, loss_fn):
    params = _scored_parameters(model)
    names = [n for n, _ in params]
    tensors = [p for _, p in params]

    def per_batch(m, x, y):
        loss = loss_fn(m(x), y)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        return {n: (p.detach() * g).abs() for n, p, g in zip(names, tensors, grads) if g is not None}

    with preserved_state(model):
        return average_batch_scores(model, batches, per_batch)


def _random_scores(model, batches, loss_fn, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = model_device(model)
    return {n: torch.rand(p.shape, generator=gen).to(device) for n, p in _scored_parameters(model)}


register(Method("Weight", _weight_scores, needs_data=False, finalize=torch.sqrt, norm_layers=True,
                description="squared weight magnitude; channel score = group L2 norm"))
register(Method("Taylor", _taylor_scores,
                description="|theta * grad| per parameter, averaged over batches"))
register(Method("Random", _random_scores, needs_data=False, options=("seed",),
                description="uniform random scores (a sanity baseline)"))

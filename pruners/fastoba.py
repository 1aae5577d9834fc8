"""fastOBA: the k-th order Taylor term of the loss change, per parameter, by nested autograd.

With δθ = θ (detached) over *all* parameters with requires_grad (normalisation parameters
included) and v = δθ:

    s_i = fastoba_delta · δθ_i · Σ_{j2..jk} ∂ᵏL / ∂θ_i ∂θ_j2 … ∂θ_jk · δθ_j2 … δθ_jk
          + delta · g_i θ_i            (the first-order term, added only when order > 1)

computed as g₁ = ∇L (kept differentiable), g_{m+1} = ∇(g_mᵀ v), s = fastoba_delta · v ⊙ g_k.
order 1 is the Taylor score θ ⊙ g (scaled by fastoba_delta; delta is not added again),
order 2 is θ ⊙ Hθ with the exact Hessian-vector product (Pearlmutter), Gauss–Newton and
within-layer blocks included. Each extra order costs one more differentiable backward pass.
"""
from __future__ import annotations

import math
from typing import Callable, List

import torch
import torch.nn as nn

from .oba import decomposed_attention
from .registry import (CriterionError, Method, ScoreDict, average_batch_scores, preserved_state,
                       register)


def _trainable(model: nn.Module):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fastoba_batch_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: Callable, order: int = 2, delta: float = 0.0,
                         fastoba_delta: float = 1.0) -> ScoreDict:
    """Per-parameter k-th order scores (see module docstring) for one batch."""
    named = _trainable(model)
    params = list(named.values())
    v = [p.detach() for p in params]
    with decomposed_attention():  # fused attention kernels have no double backward
        loss = loss_fn(model(inputs), targets)
    grads: List[torch.Tensor] = _grad(loss, params, create_graph=order > 1)
    first = grads
    for m in range(1, order):
        directional = sum((g * t).sum() for g, t in zip(grads, v) if g.requires_grad)
        if not isinstance(directional, torch.Tensor):  # nothing left depends on θ
            grads = [torch.zeros_like(p) for p in params]
            break
        grads = _grad(directional, params, create_graph=m + 1 < order)
    scores = {}
    for (name, p), direction, g, g1 in zip(named.items(), v, grads, first):
        s = fastoba_delta * direction * g.detach()
        if order > 1 and delta != 0:
            s = s + delta * g1.detach() * p.detach()
        scores[name] = s
    return scores


def _grad(output, params, create_graph):
    grads = torch.autograd.grad(output, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def estimate_fastoba(model: nn.Module, batches, loss_fn: Callable, order: int = 2,
                     delta: float = 0.0, fastoba_delta: float = 1.0) -> ScoreDict:
    """fastOBA scores averaged over batches; weights, buffers and train/eval flags unchanged."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise CriterionError(f"fastOBA order must be an integer >= 1, got {order!r}")
    for name, value in (("delta", delta), ("fastoba_delta", fastoba_delta)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise CriterionError(f"fastOBA option {name} must be a finite number, got {value!r}")
    with preserved_state(model):
        return average_batch_scores(
            model, batches, lambda m, x, y: fastoba_batch_scores(
                m, x, y, loss_fn, order=order, delta=float(delta),
                fastoba_delta=float(fastoba_delta)))


register(Method(
    name="fastOBA", estimate=estimate_fastoba, in_channels=True,
    options=("order", "delta", "fastoba_delta"),
    description="k-th order Taylor term θ ⊙ ∂ᵏL[θ,…,θ] by nested autograd (order 2: θ ⊙ Hθ)"))

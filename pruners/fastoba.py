"""fastOBA: the k-th order Taylor term of the loss change, per parameter.

With δθ = θ (detached) over *all* parameters with requires_grad (normalisation parameters
included) and v = δθ:

    s_i = fastoba_delta · δθ_i · Σ_{j2..jk} ∂ᵏL / ∂θ_i ∂θ_j2 … ∂θ_jk · δθ_j2 … δθ_jk
          + delta · g_i θ_i            (the first-order term, added only when order > 1)

order 1 is the Taylor score θ ⊙ g (scaled by fastoba_delta; delta is not added again), order 2
is θ ⊙ Hθ with the exact Hessian-vector product (Gauss–Newton and within-layer blocks included),
higher orders are the nested contractions g_{m+1} = ∇(g_mᵀ v), s = fastoba_delta · v ⊙ g_k.

Order 2, the common case, avoids most of the work of plain double backward. Hθ = ∇_θ D with
D(θ) = ⟨∇L(θ), v⟩ and v held fixed. For a convolution or linear call Z = B(X, W) + b whose
weight W and bias b are parameters used nowhere else,

    ⟨∂L/∂W, v_W⟩ + ⟨∂L/∂b, v_b⟩ = ⟨g_Z, B(X, v_W) + v_b⟩      (B is bilinear, v = θ),

so D needs only g_Z = ∂L/∂Z, never the weight gradient, and B(X, v_W) + v_b has the value of Z.
Differentiating ⟨g_Z(θ), B(X(θ), v_W) + v_b⟩ gives two parts: through g_Z, one backward of the
differentiable first backward pass; through X, the cotangent Bᵀ(g_Z, v_W), which equals this
call's own share of ∂L/∂X from the first backward (read off a private alias of X) and is injected
there by a zero-valued sink. All other parameters (normalisation affine parameters, class token,
weights used in any other way, calls whose output is modified in place) contribute ⟨∂L/∂p, v_p⟩
directly. The cost per layer is then one forward, one input-gradient and one backward of both
(four convolutions), against seven for double backward through the full gradient.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from .registry import (CriterionError, Method, ScoreDict, average_batch_scores, preserved_state,
                       register)
from .tracing import (BILINEAR_RULES, LAYER_CALLS, Slot, decomposed_attention, gradient_sink,
                      grads_or_zeros, lifted_backward_hooks, map_tensors, tensors_in)


def _trainable(model: nn.Module):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class _LayerCall:
    __slots__ = ("output", "version", "input", "alias", "weight", "bias", "bias_to_output")

    def __init__(self, output, inp, alias, weight, bias, bias_to_output):
        self.output, self.version = output, output._version
        self.input, self.alias = inp, alias
        self.weight, self.bias, self.bias_to_output = weight, bias, bias_to_output


class _LayerCallRecorder(decomposed_attention):
    """Sees every torch call of the forward pass (attention decomposed, Python-level functionals
    opened). Records conv / linear calls whose weight and bias are scored parameters passed
    directly; marks every scored parameter that appears in any other call."""

    def __init__(self, params: List[torch.Tensor]):
        super().__init__()
        self.scored = {id(p) for p in params}
        self.elsewhere = set()
        self.calls: List[_LayerCall] = []

    def call(self, func, args, kwargs):
        if func in LAYER_CALLS:
            x, w, _, remainder = BILINEAR_RULES[func](args, kwargs)
            bias, bias_to_output = remainder[0]
            if isinstance(x, torch.Tensor) and id(x) not in self.scored \
                    and id(w) in self.scored and (bias is None or id(bias) in self.scored):
                alias = x.view_as(x) if x.requires_grad else None
                if alias is not None:
                    args = map_tensors(args, lambda t: alias if t is x else t)
                    kwargs = map_tensors(kwargs, lambda t: alias if t is x else t)
                out = func(*args, **kwargs)
                self.calls.append(_LayerCall(out, x, alias, w, bias, bias_to_output))
                return out
        for t in tensors_in((args, kwargs)):
            if id(t) in self.scored:
                self.elsewhere.add(id(t))
        return func(*args, **kwargs)


def _shortcut_calls(recorder: _LayerCallRecorder):
    """(recorded calls that take part in the shortcut, ids of the parameters it covers).
    A parameter is covered when every use of it is as the weight or bias of a recorded call whose
    output was not modified in place afterwards (else its value and gradient would be those of
    another tensor)."""
    elsewhere = set(recorder.elsewhere)
    for call in recorder.calls:
        if call.output._version != call.version:
            elsewhere.update(id(t) for t in (call.weight, call.bias) if t is not None)
    direct = {id(p) for c in recorder.calls for p in (c.weight, c.bias) if p is not None} \
        - elsewhere
    calls = [c for c in recorder.calls
             if id(c.weight) in direct or (c.bias is not None and id(c.bias) in direct)]
    recorder.calls = []
    return calls, direct


def hessian_theta_product(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                          loss_fn: Callable, need_grad: bool = False):
    """(names, [Hθ per parameter], [∂L/∂θ per parameter] or None) over the trainable parameters,
    H the exact Hessian of the batch loss; see the module docstring for how."""
    named = _trainable(model)
    params = list(named.values())
    recorder = _LayerCallRecorder(params)
    with recorder:
        output = model(inputs)
    loss = loss_fn(output, targets)
    del output
    calls, direct = _shortcut_calls(recorder)
    aliased = [c for c in calls if id(c.weight) in direct and c.alias is not None]
    generic = [p for p in params if id(p) not in direct or need_grad]

    wanted = [c.output for c in calls] + [c.alias for c in aliased] + generic
    grads = list(torch.autograd.grad(loss, wanted, create_graph=True, allow_unused=True)) \
        if wanted else []
    g_out, grads = grads[:len(calls)], grads[len(calls):]
    g_alias, grads = grads[:len(aliased)], grads[len(aliased):]
    g_param = dict(zip(map(id, generic), grads))
    del grads, wanted

    terms = []
    for call, g in zip(calls, g_out):
        if g is None or not g.requires_grad:
            continue
        bias_value = None if call.bias is None else \
            call.bias_to_output(call.bias.detach(), call.output)
        if id(call.weight) in direct:
            value = call.output.detach()
            if call.bias is not None and id(call.bias) not in direct:
                value = value - bias_value
        else:
            value = bias_value
        terms.append((g * value).sum())
    for call, g in zip(aliased, g_alias):
        if g is not None:
            terms.append(gradient_sink(call.input, Slot(g.detach(), uses=1)))
    for p in params:
        g = g_param.get(id(p))
        if id(p) not in direct and g is not None and g.requires_grad:
            terms.append((g * p.detach()).sum())
    del calls, aliased, g_out, g_alias

    if terms:
        hv = grads_or_zeros(torch.stack(terms).sum(), params, create_graph=False)
    else:
        hv = [torch.zeros_like(p) for p in params]
    del terms
    first = None
    if need_grad:
        first = [torch.zeros_like(p) if g_param.get(id(p)) is None else g_param[id(p)].detach()
                 for p in params]
    return list(named), hv, first


def nested_scores(model, inputs, targets, loss_fn, order):
    """(names, k-th order contraction per parameter, first gradient) by plain nested autograd."""
    named = _trainable(model)
    params = list(named.values())
    v = [p.detach() for p in params]
    with decomposed_attention():  # fused attention kernels have no double backward
        loss = loss_fn(model(inputs), targets)
    grads: List[torch.Tensor] = grads_or_zeros(loss, params, create_graph=order > 1)
    first = grads
    for m in range(1, order):
        directional = sum((g * t).sum() for g, t in zip(grads, v) if g.requires_grad)
        if not isinstance(directional, torch.Tensor):  # nothing left depends on θ
            grads = [torch.zeros_like(p) for p in params]
            break
        grads = grads_or_zeros(directional, params, create_graph=m + 1 < order)
    return list(named), [g.detach() for g in grads], [g.detach() for g in first]


def fastoba_batch_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: Callable, order: int = 2, delta: float = 0.0,
                         fastoba_delta: float = 1.0) -> ScoreDict:
    """Per-parameter k-th order scores (see module docstring) for one batch. Module backward
    hooks are lifted meanwhile: they would fire on (and could alter) the scoring passes."""
    with lifted_backward_hooks(model):
        if order == 2:
            names, kth, first = hessian_theta_product(model, inputs, targets, loss_fn,
                                                      need_grad=delta != 0)
        else:
            names, kth, first = nested_scores(model, inputs, targets, loss_fn, order)
    params = dict(model.named_parameters())
    scores: Dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        theta = params[name].detach()
        s = fastoba_delta * theta * kth[i]
        if order > 1 and delta != 0:
            s = s + delta * first[i] * theta
        scores[name] = s
    return scores


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
    description="k-th order Taylor term θ ⊙ ∂ᵏL[θ,…,θ] (order 2: the exact θ ⊙ Hθ)"))

"""Optimal Brain Apoptosis (OBA): per-parameter scores from the inter-layer part of the Hessian.

Score of parameter i:  s_i = δθ_i · [H̃ δθ]_i + delta · g_i θ_i,   δθ = θ (detached).

Perturbed parameters (they carry the tangent δθ = θ and are scored): every parameter with
requires_grad except the affine parameters of normalisation layers (BatchNorm, InstanceNorm,
LayerNorm, GroupNorm, RMSNorm), which carry tangent 0 and get no score. That covers conv and
linear weights and biases, attention projections and free-standing parameters used directly in
forward (class token, position embedding).

What H̃ is. Every *bilinear node* of the forward graph has output Z = B(a, b): F.linear and
convolutions (operands: input and weight; the bias is an additive, linear remainder), and
matmul / mm / bmm / mv / addmm / baddbmm / two-operand einsum (operands P, Q). With the ordinary
output gradient g_Z = ∂L/∂Z and the forward tangents ȧ, ḃ along δθ, both held constant,

    H̃ δθ = ∇_θ Σ_nodes ⟨ g_Z , B(a(θ), ḃ) + B(ȧ, b(θ)) ⟩ .

That is the part of the Hessian-vector product produced by the second derivative of the bilinear
nodes. Left out: the Gauss–Newton part Jᵀ∇²ℓJ (loss curvature) and the curvature of smooth
non-bilinear operations (softmax, LayerNorm / train-mode BatchNorm normalisation, GELU, ...).
Hence for networks whose only nonlinearities are piecewise linear (ReLU, max-pool, eval-mode
BatchNorm), H̃ = H − GGN exactly.

Operands are classified by data dependence: an operand is "static" when it is computed from
parameters, buffers and constants only (a weight, a slice of a packed projection weight, a class
token), and an "activation" when it depends on the input batch. Each node contributes two
terms, each assigned to one component:

* upward   (--upward_delta): ∇ of ⟨g_Z, B(ȧ, W(θ))⟩ into a static operand W, with the tangent ȧ
  of the activation it multiplies, i.e. a weight's score coming from the perturbation of the
  earlier layers that produced its input;
* downward (--downward_delta): ∇ of ⟨g_Z, B(X(θ), Ẇ)⟩ into an activation operand X, with the
  tangent Ẇ of the static operand, flowing back to the parameters that produced X;
* parallel (--parallel_delta): both terms of nodes whose operands are both activations (Q·Kᵀ,
  A·V in attention) or both static (a product of two weights).

Computation, one batch: a single forward pass carrying forward-mode tangents (dual tensors);
a `TorchFunctionMode` intercepts the bilinear calls (and decomposes
F.scaled_dot_product_attention into its two matmuls around the softmax; Python-level functionals
such as F.multi_head_attention_forward are run with their own override check skipped so the
mode sees the calls inside them). At each node it computes the two terms B(a, ḃ) and B(ȧ, b)
once: their detached sum (plus the bias tangent) is the node's output tangent, and each term is
attached to a zero-valued sink whose backward injects the node's g_Z. Then one ordinary
backward gives every g_Z, and one backward of the sum of sinks gives H̃δθ.
"""
from __future__ import annotations

import math
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .registry import (CriterionError, Method, ScoreDict, average_batch_scores, preserved_state,
                       register)

_NORM_TYPES = tuple(t for t in (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None)

COMPONENTS = ("upward", "downward", "parallel")


def perturbed_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Parameters OBA perturbs and scores: requires_grad, not a normalisation affine parameter."""
    frozen = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES)
              for p in m.parameters(recurse=False)}
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in frozen}


# ----------------------------------------------------------------------------- bilinear calls
# A rule turns the (args, kwargs) of one call into (a, b, bilinear, remainder):
#   bilinear(p, q) recomputes the call's bilinear part B with every other argument fixed;
#   remainder lists (tensor, how its tangent enters the output tangent) for additive terms.

def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _linear_rule(args, kwargs):
    x, w, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), \
        _arg(args, kwargs, 2, "bias")
    return x, w, (lambda p, q: F.linear(p, q)), [(bias, lambda t, z: t)]


def _conv_rule(func, spatial_dims):
    def rule(args, kwargs):
        x, w, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), \
            _arg(args, kwargs, 2, "bias")
        rest = args[3:]
        kw = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}

        def bias_tangent(t, z):  # bias runs along the channel axis, before the spatial axes
            return t.reshape(-1, *([1] * spatial_dims))
        return x, w, (lambda p, q: func(p, q, None, *rest, **kw)), [(bias, bias_tangent)]
    return rule


def _two_operand_rule(func, swap=False):
    def rule(args, kwargs):
        a = _arg(args, kwargs, 0, "input")
        b = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if k != "input")
        if swap:  # Tensor.__rmatmul__(self, other) is other @ self
            a, b = b, a
        return a, b, (lambda p, q: func(p, q)), []
    return rule


def _scaled_product_rule(product):
    # addmm / baddbmm: beta * input + alpha * product(m1, m2)
    def rule(args, kwargs):
        inp = _arg(args, kwargs, 0, "input")
        m1, m2 = _arg(args, kwargs, 1, "mat1" if product is torch.mm else "batch1"), \
            _arg(args, kwargs, 2, "mat2" if product is torch.mm else "batch2")
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        bil = (lambda p, q: product(p, q)) if alpha == 1 else (lambda p, q: alpha * product(p, q))
        return m1, m2, bil, [(inp, lambda t, z: t if beta == 1 else beta * t)]
    return rule


def _einsum_rule(args, kwargs):
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2:
        return None  # only two-operand contractions are bilinear nodes
    return operands[0], operands[1], (lambda p, q: torch.einsum(equation, p, q)), []


_RULES: Dict[Callable, Callable] = {
    F.linear: _linear_rule,
    torch.matmul: _two_operand_rule(torch.matmul),
    torch.Tensor.matmul: _two_operand_rule(torch.matmul),
    torch.Tensor.__matmul__: _two_operand_rule(torch.matmul),
    torch.Tensor.__rmatmul__: _two_operand_rule(torch.matmul, swap=True),
    torch.mm: _two_operand_rule(torch.mm),
    torch.Tensor.mm: _two_operand_rule(torch.mm),
    torch.bmm: _two_operand_rule(torch.bmm),
    torch.Tensor.bmm: _two_operand_rule(torch.bmm),
    torch.mv: _two_operand_rule(torch.mv),
    torch.Tensor.mv: _two_operand_rule(torch.mv),
    torch.addmm: _scaled_product_rule(torch.mm),
    torch.Tensor.addmm: _scaled_product_rule(torch.mm),
    torch.baddbmm: _scaled_product_rule(torch.bmm),
    torch.Tensor.baddbmm: _scaled_product_rule(torch.bmm),
    torch.einsum: _einsum_rule,
}
for _func, _dims in ((F.conv1d, 1), (F.conv2d, 2), (F.conv3d, 3),
                     (F.conv_transpose1d, 1), (F.conv_transpose2d, 2), (F.conv_transpose3d, 3)):
    _RULES[_func] = _conv_rule(_func, _dims)


def _attention_by_matmuls(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                          scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention written as matmul → softmax → matmul, so that both
    products are visible as bilinear nodes."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    if enable_gqa and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool,
                          device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return torch.matmul(weights, value)


_NO_OVERRIDE_CHECK = {name: (lambda *a, **k: False) for name in (
    "has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")}
_OPENED: Dict[Callable, Callable] = {}


def _opened(func: types.FunctionType) -> Callable:
    """A copy of a Python-level torch function whose `__torch_function__` check is switched off,
    so that running it under the mode exposes the calls inside it (e.g. the projections and
    attention inside F.multi_head_attention_forward)."""
    if func not in _OPENED:
        glob = dict(func.__globals__)
        glob.update({k: v for k, v in _NO_OVERRIDE_CHECK.items() if k in glob})
        copy = types.FunctionType(func.__code__, glob, func.__name__, func.__defaults__,
                                  func.__closure__)
        copy.__kwdefaults__ = func.__kwdefaults__
        _OPENED[func] = copy
    return _OPENED[func]


class decomposed_attention(TorchFunctionMode):
    """Context manager: inside it, F.scaled_dot_product_attention (including the call inside
    nn.MultiheadAttention) runs as matmul → softmax → matmul. Used where higher derivatives
    are taken through attention: the fused CPU / flash kernels have no double backward."""

    def __init__(self):
        super().__init__()
        self._opening = set()

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            with self:
                return _attention_by_matmuls(*args, **kwargs)
        if isinstance(func, types.FunctionType) and func not in self._opening:
            self._opening.add(func)
            try:
                with self:
                    return _opened(func)(*args, **kwargs)
            finally:
                self._opening.discard(func)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- surrogate sinks

class _Slot:
    """g_Z of one node, filled after the ordinary backward, released after its last use."""
    __slots__ = ("grad", "uses")

    def __init__(self):
        self.grad, self.uses = None, 0


class _Sink(torch.autograd.Function):
    """Zero-valued function of a node term U; its backward injects scale · g_Z into U's graph,
    so that d/dθ Σ sinks = ∇_θ Σ scale ⟨g_Z, U(θ)⟩ without keeping U itself."""

    @staticmethod
    def forward(ctx, term, slot, scale):
        ctx.slot, ctx.scale = slot, scale
        return term.new_zeros(())

    @staticmethod
    def backward(ctx, _unused):
        slot = ctx.slot
        grad = slot.grad
        slot.uses -= 1
        if slot.uses <= 0:
            slot.grad = None
        if grad is None:
            return None, None, None
        return (grad if ctx.scale == 1 else ctx.scale * grad), None, None


def _same_value(tangent, primal) -> bool:
    if tangent is None or tangent.shape != primal.shape:
        return False
    if tangent.data_ptr() == primal.data_ptr() and tangent.stride() == primal.stride():
        return True
    return bool(torch.equal(tangent, primal))


def _primal(t):
    return fwAD.unpack_dual(t).primal if isinstance(t, torch.Tensor) else t


def _tangent(t):
    """The forward tangent of t, detached: tangents are constants of the surrogate (forward AD
    would otherwise make them differentiable functions of the primal)."""
    if not isinstance(t, torch.Tensor):
        return None
    tangent = fwAD.unpack_dual(t).tangent
    return None if tangent is None else tangent.detach()


def _tensors(tree, out):
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            _tensors(item, out)
    elif isinstance(tree, dict):
        for item in tree.values():
            _tensors(item, out)
    return out


def _map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(t, fn) for t in tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return tree


class _BilinearTracer(TorchFunctionMode):
    """Sees every torch call of the forward pass; builds tangents and sinks at bilinear nodes."""

    def __init__(self, scales: Dict[str, float], static: List[torch.Tensor]):
        super().__init__()
        self.scales = scales
        self.static = WeakIdKeyDictionary()
        for t in static:
            self.static[t] = True
        self.watched: List[torch.Tensor] = []  # tensors whose ∂L/∂· the sinks need
        self.slots: List[_Slot] = []
        self.sinks: List[torch.Tensor] = []
        self._opening = set()

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        parts = rule(args, kwargs) if rule is not None else None
        if parts is not None:
            out = self._bilinear(func, args, kwargs, *parts)
        elif func is F.scaled_dot_product_attention:
            with self:
                out = _attention_by_matmuls(*args, **kwargs)
        elif isinstance(func, types.FunctionType) and func not in self._opening:
            self._opening.add(func)
            try:
                with self:
                    out = _opened(func)(*args, **kwargs)
            finally:
                self._opening.discard(func)
        else:
            out = func(*args, **kwargs)
        self._track_static(args, kwargs, out)
        return out

    def _is_static(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.static

    def _track_static(self, args, kwargs, out):
        outs = _tensors(out, [])
        if not outs:
            return
        static = all(t in self.static for t in _tensors(kwargs, _tensors(args, [])))
        for t in outs:
            if static:
                self.static[t] = True
            elif t in self.static:
                del self.static[t]

    def _component(self, into, other) -> str:
        into_static, other_static = self._is_static(into), self._is_static(other)
        if into_static and not other_static:
            return "upward"
        if other_static and not into_static:
            return "downward"
        return "parallel"

    def _watch(self, tensor) -> _Slot:
        """A slot that receives ∂L/∂tensor from the ordinary backward."""
        slot = _Slot()
        self.slots.append(slot)
        self.watched.append(tensor)
        return slot

    def _bilinear(self, func, args, kwargs, a, b, bil, remainder):
        a_p, a_t, b_p, b_t = _primal(a), _tangent(a), _primal(b), _tangent(b)
        # (into, its primal, tangent of the other operand, term B with `into` differentiable)
        terms = [(a, a_p, b, b_t, lambda: bil(a_p, b_t)), (b, b_p, a, a_t, lambda: bil(a_t, b_p))]
        # Shortcut. A static operand that is a linear function of the parameters (a weight, a
        # view or slice of one) has tangent == value, since δθ = θ. Then the term into the other
        # operand X is B(X, W) = Z minus its additive remainder, so it costs nothing in the
        # forward pass, and its gradient w.r.t. X is this call's own contribution to ∂L/∂X in
        # the ordinary backward: X enters the call through a private alias whose gradient is
        # read off there and re-injected by a sink.
        same = [self._is_static(t) and _same_value(t_t, t_p)
                for t, t_p, t_t in ((a, a_p, a_t), (b, b_p, b_t))]
        alias = {}
        if a is not b:
            for k, (into, into_p, other, other_t, _) in enumerate(terms):
                if same[1 - k] and into_p.requires_grad \
                        and self.scales[self._component(into, other)] != 0:
                    alias[id(into)] = into_p.view_as(into_p)

        def primal(t):
            return alias.get(id(t)) if id(t) in alias else _primal(t)
        z = func(*_map_tensors(args, primal), **_map_tensors(kwargs, primal))

        tangent = None
        z_slot = None
        bilinear_part = None  # Z minus the remainder, for the shortcut
        for k, (into, into_p, other, other_t, term_fn) in enumerate(terms):
            if other_t is None:
                continue
            scale = self.scales[self._component(into, other)]
            if same[1 - k]:
                if bilinear_part is None:
                    bilinear_part = z.detach()
                    for extra, to_output in remainder:
                        if extra is not None:
                            bilinear_part = bilinear_part - to_output(_primal(extra), z)
                value = bilinear_part
                if id(into) in alias:
                    slot = self._watch(alias[id(into)])
                    slot.uses = 1
                    self.sinks.append(_Sink.apply(into_p, slot, scale))
            else:
                term = term_fn()
                value = term.detach()
                if term.requires_grad and scale != 0:
                    if z_slot is None:
                        z_slot = self._watch(z)
                    z_slot.uses += 1
                    self.sinks.append(_Sink.apply(term, z_slot, scale))
                del term
            tangent = value if tangent is None else tangent + value
        for extra, to_output in remainder:
            extra_t = _tangent(extra)
            if extra_t is not None:
                piece = to_output(extra_t, z)
                tangent = piece.expand_as(z).clone() if tangent is None else tangent + piece
        if tangent is None:
            return z
        return fwAD.make_dual(z, tangent)


# ----------------------------------------------------------------------------- public functions

def _scales(upward_delta, downward_delta, parallel_delta) -> Dict[str, float]:
    return {"upward": float(upward_delta), "downward": float(downward_delta),
            "parallel": float(parallel_delta)}


def _oba_pass(model, inputs, targets, loss_fn, scales, need_grad):
    """One forward with tangents, the ordinary backward, the surrogate backward.
    Returns (loss, H̃δθ list, gradient list or None) over perturbed_parameters(model)."""
    perturbed = perturbed_parameters(model)
    params = list(perturbed.values())
    static = list(model.parameters()) + list(model.buffers())
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, p.detach()) for n, p in perturbed.items()}
        tracer = _BilinearTracer(scales, static + list(duals.values()))
        with tracer:
            output = torch.func.functional_call(model, duals, (inputs,))
        del duals
        output = _map_tensors(output, _primal)
        loss = loss_fn(output, targets)
        del output
    # Both backward passes run after the dual level is closed: inside it, saved tensors would
    # bring their tangents along and every backward op would also push tangents (a wasted
    # forward-over-reverse pass costing about as much again).
    wanted = tracer.watched + (params if need_grad else [])
    grads = torch.autograd.grad(loss, wanted, retain_graph=True, allow_unused=True) \
        if wanted else []
    for slot, g in zip(tracer.slots, grads[:len(tracer.watched)]):
        slot.grad = g
    param_grads = list(grads[len(tracer.watched):]) if need_grad else None
    del grads
    tracer.watched.clear()
    sinks, tracer.sinks = tracer.sinks, []
    hv = [None] * len(params)
    if sinks:
        surrogate = torch.stack(sinks).sum() if len(sinks) > 1 else sinks[0]
        del sinks
        hv = list(torch.autograd.grad(surrogate, params, allow_unused=True))
    hv = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]
    if param_grads is not None:
        param_grads = [torch.zeros_like(p) if g is None else g
                       for p, g in zip(params, param_grads)]
    return loss.detach(), list(perturbed), hv, param_grads


def oba_hvp(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable,
            upward_delta: float = 1.0, downward_delta: float = 1.0, parallel_delta: float = 1.0
            ) -> Tuple[torch.Tensor, ScoreDict]:
    """(loss, {perturbed parameter name: H̃δθ of that shape}) for one batch, δθ = θ."""
    loss, names, hv, _ = _oba_pass(model, inputs, targets, loss_fn,
                                   _scales(upward_delta, downward_delta, parallel_delta), False)
    return loss, dict(zip(names, hv))


def oba_batch_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     loss_fn: Callable, delta: float = 0.0, upward_delta: float = 1.0,
                     downward_delta: float = 1.0, parallel_delta: float = 1.0) -> ScoreDict:
    """s_i = δθ_i · [H̃δθ]_i + delta · g_i θ_i for one batch, over the perturbed parameters."""
    perturbed = perturbed_parameters(model)
    _, names, hv, grads = _oba_pass(model, inputs, targets, loss_fn,
                                    _scales(upward_delta, downward_delta, parallel_delta),
                                    delta != 0)
    scores = {}
    for i, name in enumerate(names):
        theta = perturbed[name].detach()
        s = theta * hv[i]
        if delta != 0:
            s = s + delta * grads[i] * theta
        scores[name] = s.detach()
    return scores


def _check_number(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise CriterionError(f"OBA option {name} must be a finite number, got {value!r}")
    return float(value)


def estimate_oba(model: nn.Module, batches, loss_fn: Callable, delta: float = 0.0,
                 upward_delta: float = 1.0, downward_delta: float = 1.0,
                 parallel_delta: float = 1.0) -> ScoreDict:
    """OBA scores averaged over batches; weights, buffers and train/eval flags unchanged."""
    opts = {k: _check_number(k, v) for k, v in dict(
        delta=delta, upward_delta=upward_delta, downward_delta=downward_delta,
        parallel_delta=parallel_delta).items()}
    with preserved_state(model):
        return average_batch_scores(
            model, batches, lambda m, x, y: oba_batch_scores(m, x, y, loss_fn, **opts))


register(Method(
    name="OBA", estimate=estimate_oba, in_channels=True,
    options=("delta", "upward_delta", "downward_delta", "parallel_delta"),
    description="Optimal Brain Apoptosis: θ ⊙ H̃θ over the bilinear (inter-layer) Hessian "
                "blocks, plus delta · θ ⊙ g"))

"""Shared machinery for criteria that watch the forward pass call by call (OBA, fastOBA).

* Tensor tree walkers: `tensors_in`, `map_tensors`.
* Bilinear calls: `BILINEAR_RULES` splits a conv / linear / matmul-family / two-operand einsum
  call into its two operands, its bilinear part B and its additive remainder (the bias);
  `LAYER_CALLS` are the ones of the form B(input, weight) + bias.
* `decomposed_attention`: a `TorchFunctionMode` that runs F.scaled_dot_product_attention as
  matmul → softmax → matmul and opens Python-level functionals (F.multi_head_attention_forward)
  so that the calls inside them are seen; tracers subclass it.
* `Slot` / `gradient_sink`: a zero-valued node whose backward injects a gradient known only
  after the ordinary backward pass (∇_θ ⟨g, U(θ)⟩ without keeping U); `gradient_probe`: an
  identity node that hands ∂L/∂· to a callback while that backward pass runs.
* `input_transpose` / `weight_transpose`: closed-form input and weight gradients of conv /
  linear calls.
* `lifted_backward_hooks`: module backward hooks taken off for a scoring pass, put back after;
  `out_of_place_modules`: modules' in-place flags switched off the same way.
* `grads_or_zeros`: torch.autograd.grad with zeros for unused inputs.
"""
from __future__ import annotations

import math
import types
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.module as module_impl
from torch.overrides import TorchFunctionMode


# ----------------------------------------------------------------------------- tensor trees

def tensors_in(tree, out: List[torch.Tensor] | None = None) -> List[torch.Tensor]:
    """Every tensor in a nest of lists, tuples and dict values, appended to `out` (returned)."""
    out = [] if out is None else out
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            tensors_in(item, out)
    elif isinstance(tree, dict):
        for item in tree.values():
            tensors_in(item, out)
    return out


def map_tensors(tree, fn: Callable):
    """The same nest with every tensor t replaced by fn(t); other leaves kept."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(t, fn) for t in tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    return tree


def grads_or_zeros(output: torch.Tensor, inputs: Sequence[torch.Tensor],
                   create_graph: bool = False) -> List[torch.Tensor]:
    """∂output/∂inputs, zeros (not None) for inputs the output does not depend on."""
    grads = torch.autograd.grad(output, inputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]


# ----------------------------------------------------------------------------- bilinear calls
# A rule turns the (args, kwargs) of one call into (a, b, bilinear, remainder), or None when the
# call is not bilinear: bilinear(p, q) recomputes the call's bilinear part B with every other
# argument fixed; remainder lists (tensor, how its tangent enters the output) for additive terms.

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


# calls of the form B(input, weight) + bias, linear in (weight, bias)
LAYER_CALLS = (F.linear, F.conv1d, F.conv2d, F.conv3d,
               F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)

BILINEAR_RULES: Dict[Callable, Callable] = {
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
    BILINEAR_RULES[_func] = _conv_rule(_func, _dims)


# ----------------------------------------------------------------------------- attention

def attention_by_matmuls(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
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


def opened(func: types.FunctionType) -> Callable:
    """A copy of a Python-level torch function whose `__torch_function__` check is switched off,
    so that running it under a mode exposes the calls inside it (e.g. the projections and
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
    nn.MultiheadAttention) runs as matmul → softmax → matmul, and Python-level torch functions
    run opened (their inner calls pass through the mode). Used where higher derivatives are
    taken through attention: the fused CPU / flash kernels have no double backward.

    Tracers subclass it: `call(func, args, kwargs)` receives every call that is neither
    attention nor a Python-level function (the default runs it)."""

    def __init__(self):
        super().__init__()
        self._opening = set()

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            with self:
                return attention_by_matmuls(*args, **kwargs)
        if isinstance(func, types.FunctionType) and func not in self._opening:
            self._opening.add(func)
            try:
                with self:
                    return opened(func)(*args, **kwargs)
            finally:
                self._opening.discard(func)
        return self.call(func, args, kwargs)

    def call(self, func, args, kwargs):
        """One torch call seen by the mode (subclasses intercept here)."""
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- gradient sinks

class Slot:
    """A gradient g filled in after the ordinary backward, released after its last use."""
    __slots__ = ("grad", "uses")

    def __init__(self, grad: torch.Tensor | None = None, uses: int = 0):
        self.grad, self.uses = grad, uses

    def take(self) -> torch.Tensor | None:
        """The gradient, for one use (released after the last)."""
        grad = self.grad
        self.uses -= 1
        if self.uses <= 0:
            self.grad = None
        return grad


class TransposedSlot:
    """∂L/∂x of one call's input x, made when a sink needs it from the slot of the call's output
    z: Bᵀ(∂L/∂z). Keeping ∂L/∂x of every layer until the surrogate backward would cost one more
    activation-sized set of tensors; this costs one input-gradient product per layer instead."""
    __slots__ = ("source", "transpose")

    def __init__(self, source: Slot, transpose: Callable[[torch.Tensor], torch.Tensor]):
        self.source, self.transpose = source, transpose
        source.uses += 1

    def take(self) -> torch.Tensor | None:
        grad = self.source.take()
        return None if grad is None else self.transpose(grad)


_CONV_INPUT_GRADIENTS = {F.conv1d: torch.nn.grad.conv1d_input, F.conv2d: torch.nn.grad.conv2d_input,
                         F.conv3d: torch.nn.grad.conv3d_input}
_CONV_WEIGHT_GRADIENTS = {F.conv1d: torch.nn.grad.conv1d_weight,
                          F.conv2d: torch.nn.grad.conv2d_weight,
                          F.conv3d: torch.nn.grad.conv3d_weight}


def _closed_form_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the closed forms below handle an F.linear call (2-d weight, one dtype)."""
    return weight.dim() == 2 and weight.dtype == x.dtype


def _closed_form_conv_options(func, args, kwargs, x: torch.Tensor, weight: torch.Tensor
                              ) -> dict | None:
    """stride / padding / dilation / groups of an F.conv1d/2d/3d call whose gradients the
    closed forms below handle (batched input, numeric padding, one dtype), else None."""
    if func not in _CONV_INPUT_GRADIENTS or weight.dtype != x.dtype:
        return None
    names = ("stride", "padding", "dilation", "groups")
    options = {name: _arg(args, kwargs, 3 + i, name, default)
               for i, (name, default) in enumerate(zip(names, (1, 0, 1, 1)))}
    if isinstance(options["padding"], str) or x.dim() != weight.dim():
        return None  # 'same' / 'valid' padding, unbatched input: the general paths handle them
    return options


def input_transpose(func, args, kwargs, x: torch.Tensor, weight: torch.Tensor
                    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """g ↦ ∂⟨g, B(x, weight)⟩/∂x for an F.linear or F.conv1d/2d/3d call (batched input, numeric
    padding, one dtype), or None for calls without such a closed form here."""
    if func is F.linear:
        return (lambda g: g @ weight) if _closed_form_linear(x, weight) else None
    options = _closed_form_conv_options(func, args, kwargs, x, weight)
    if options is None:
        return None
    shape, conv_input = x.shape, _CONV_INPUT_GRADIENTS[func]
    return lambda g: conv_input(shape, weight, g, **options)


def weight_transpose(func, args, kwargs, x: torch.Tensor, weight: torch.Tensor
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """(u, g) ↦ ∂⟨g, B(u, w)⟩/∂w at w = weight, for an F.linear or F.conv1d/2d/3d call with input
    x (the same conditions as input_transpose), or None. u has x's shape: e.g. x's tangent."""
    if func is F.linear:
        if not _closed_form_linear(x, weight):
            return None
        return lambda u, g: g.reshape(-1, g.shape[-1]).t() @ u.reshape(-1, u.shape[-1])
    options = _closed_form_conv_options(func, args, kwargs, x, weight)
    if options is None:
        return None
    shape, conv_weight = weight.shape, _CONV_WEIGHT_GRADIENTS[func]
    return lambda u, g: conv_weight(u, shape, g, **options)


class _GradientSink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, term, slot, scale):
        ctx.slot, ctx.scale = slot, scale
        return term.new_zeros(())

    @staticmethod
    def backward(ctx, _unused):
        grad = ctx.slot.take()
        if grad is None:
            return None, None, None
        return (grad if ctx.scale == 1 else ctx.scale * grad), None, None


def gradient_sink(term: torch.Tensor, slot: Slot, scale: float = 1.0) -> torch.Tensor:
    """A zero-valued scalar of `term` whose backward injects scale · slot.grad into term's graph:
    d/dθ Σ sinks = ∇_θ Σ scale ⟨g, U(θ)⟩ without keeping U itself. Each backward through it
    uses the slot once."""
    return _GradientSink.apply(term, slot, scale)


class _Probe(torch.autograd.Function):
    """Identity whose backward hands the incoming gradient to a receiver until it takes it."""

    @staticmethod
    def forward(ctx, tensor, anchor, receiver):
        ctx.receiver = receiver
        ctx.set_materialize_grads(False)  # no zero tensors where no gradient arrives
        # A new tensor, not a view of the input: the caller guards in-place changes of it itself.
        return tensor.detach()

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and ctx.receiver is not None and ctx.receiver(grad):
            ctx.receiver = None
        return grad, None, None


def gradient_probe(tensor: torch.Tensor, anchor: torch.Tensor,
                   receiver: Callable[[torch.Tensor], bool]) -> torch.Tensor:
    """`tensor` passed through a node that calls receiver(∂L/∂tensor) in every backward pass
    that brings it a gradient, until the receiver returns True (it took it). `anchor` is a
    scalar leaf that requires grad, to be among the inputs of the backward meant
    (torch.autograd.grad(loss, [anchor, ...])): every probe then lies on a path to a requested
    input, so it runs even where nothing else upstream is requested (a first layer), and no
    gradient is kept beyond what the receiver keeps. A probe no gradient reaches never calls
    its receiver."""
    return _Probe.apply(tensor, anchor, receiver)


# ----------------------------------------------------------------------------- module hooks

_HOOK_DICTS = ("_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = ("_global_backward_hooks", "_global_backward_pre_hooks")


class out_of_place_modules:
    """Context manager: every module with a boolean `inplace` flag (ReLU, Hardtanh, Dropout, ...)
    runs out of place inside it, and gets its flag back on exit. An in-place activation rewrites
    the autograd history of the conv / linear output it follows, so a gradient read at that
    output would be the one after the activation."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self._flipped = [m for m in self.model.modules() if getattr(m, "inplace", None) is True]
        for m in self._flipped:
            m.inplace = False
        return self.model

    def __exit__(self, *exc):
        for m in self._flipped:
            m.inplace = True
        return False


class lifted_backward_hooks:
    """Context manager: the backward hooks and backward pre-hooks of every module of `model`
    (full — `register_full_backward_hook`, which wraps a module's inputs and outputs in a custom
    Function that has no forward-mode rule — and legacy), and the global module backward hooks,
    are taken off for the scoring pass and put back on exit: the same dict objects (so existing
    handles still remove them) and the same full/legacy flags. Scoring's backward passes are
    internal; user hooks must neither break them nor see (or change) their gradients."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self._saved = []
        for m in self.model.modules():
            if any(getattr(m, name) for name in _HOOK_DICTS):
                self._saved.append((m, [getattr(m, name) for name in _HOOK_DICTS],
                                    m._is_full_backward_hook))
                for name in _HOOK_DICTS:
                    setattr(m, name, OrderedDict())
        self._global = [getattr(module_impl, name) for name in _GLOBAL_HOOK_DICTS]
        for name in _GLOBAL_HOOK_DICTS:
            setattr(module_impl, name, OrderedDict())
        return self.model

    def __exit__(self, *exc):
        for name, saved in zip(_GLOBAL_HOOK_DICTS, self._global):
            setattr(module_impl, name, saved)
        for m, dicts, full in self._saved:
            for name, saved in zip(_HOOK_DICTS, dicts):
                setattr(m, name, saved)
            m._is_full_backward_hook = full
        self._saved, self._global = [], []
        return False

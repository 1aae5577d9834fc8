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
terms, each assigned to one component of H̃δθ:

* upstream   U: ∇ of ⟨g_Z, B(Ẋ, W(θ))⟩ into a static operand W, with the tangent Ẋ of the
  activation it multiplies: for a parameter of layer l, Σ_j H̃_ij δθ_j over the parameters j
  of the layers *before* l (those that produced its input);
* downstream D: ∇ of ⟨g_Z, B(X(θ), Ẇ)⟩ into an activation operand X, with the tangent Ẇ of the
  static operand, flowing back to the parameters that produced X: Σ_j H̃_ij δθ_j over the
  parameters j of the layers *after* l (those that consume its output);
* parallel   P: both terms of nodes whose operands are both activations (Q·Kᵀ, A·V in
  attention: two branches multiplied together) or both static (a product of two weights).

The flags have the meaning of the published OBA code (NEU-REAL/OBA). That code scales the
perturbation, δθ = d·θ, on both sides of a term (the scored parameter's and the other layer's), so:

    s_i = upward_delta² · θ_i D_i + downward_delta² · θ_i U_i
          + parallel_delta · downward_delta · θ_i P_i + delta · g_i θ_i .

--upward_delta scales the importance that travels upward (towards the input) from the layers
after l, i.e. D; --downward_delta scales the importance carried downward by the forward
propagation of the earlier layers' perturbation, i.e. U, and that same propagation supplies the
other branch's perturbation in a parallel term, hence parallel_delta · downward_delta on P.
With all three at 1 (the default) s_i = θ_i [H̃θ]_i.

Computation, one batch: a single forward pass carrying forward-mode tangents (dual tensors);
a `TorchFunctionMode` (pruners.tracing) intercepts the bilinear calls (and decomposes
F.scaled_dot_product_attention into its two matmuls around the softmax; Python-level functionals
such as F.multi_head_attention_forward are run with their own override check skipped so the
mode sees the calls inside them). At each node it computes the two terms B(a, ḃ) and B(ȧ, b)
once: their detached sum (plus the bias tangent) is the node's output tangent, and each term is
attached to a zero-valued sink whose backward injects the node's g_Z. Then one ordinary
backward gives every g_Z, and one backward of the sum of sinks gives H̃δθ. Module backward
hooks are lifted for the pass and put back after (pruners.tracing.lifted_backward_hooks).

Memory (peak about 1.6–1.7 training steps on the CIFAR networks, from 1.9–2.0): autograd keeps
only primals, never tangents, because every call that is not a product and whose inputs carry
tangents runs twice, on the primals with autograd and on the duals without
(`_BilinearTracer.call`); and the upstream term of a conv / linear
weight, ∂⟨g_Z, B(Ẋ, W)⟩/∂W, is made in closed form by a probe on Z while the ordinary backward
passes it, so the input tangent Ẋ is let go there instead of being kept for the surrogate
backward (where the input is larger than the weight).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from .registry import (CriterionError, Method, ScoreDict, average_batch_scores, preserved_state,
                       register)
from .tracing import (BILINEAR_RULES, Slot, TransposedSlot, decomposed_attention,
                      gradient_probe, gradient_sink, input_transpose, lifted_backward_hooks,
                      map_tensors, out_of_place_modules, tensors_in, weight_transpose)

_NORM_TYPES = tuple(t for t in (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None)

COMPONENTS = ("upstream", "downstream", "parallel")


def perturbed_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Parameters OBA perturbs and scores: requires_grad, not a normalisation affine parameter."""
    frozen = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES)
              for p in m.parameters(recurse=False)}
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in frozen}


# ----------------------------------------------------------------------------- the tracer

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


def _with_constant_tangent(t):
    """t with its tangent detached: tangents are constants of the surrogate, and the autograd
    graph forward AD builds for them (the jvp of every op, with its saved tensors) would
    otherwise stay alive as long as t does."""
    if not isinstance(t, torch.Tensor):
        return t
    primal, tangent = fwAD.unpack_dual(t)
    if tangent is None or tangent.grad_fn is None:
        return t
    return fwAD.make_dual(primal, tangent.detach())


def _detached_dual(t):
    """t's primal and tangent, both detached, as a dual (non-tensors unchanged)."""
    if not isinstance(t, torch.Tensor):
        return t
    primal, tangent = fwAD.unpack_dual(t)
    if tangent is None:
        return primal.detach()
    return fwAD.make_dual(primal.detach(), tangent.detach())


# Calls that act on the tensor object itself rather than compute a new value: run once, on the
# original arguments (running them on stand-ins would act on the stand-ins).
_ACTS_ON_OBJECT = frozenset({"__get__", "__set__", "__delete__", "__setitem__", "retain_grad",
                             "register_hook", "register_post_accumulate_grad_hook", "backward"})


def _runs_once(func, kwargs) -> bool:
    """Whether a call that is not a product must run once, on the duals: it writes into an
    argument (torch's naming: a trailing underscore, also on an op overload such as
    aten.mul_.Tensor; or an `out=` / `inplace=True` argument) or acts on the tensor object
    (attributes, hooks)."""
    name = getattr(func, "__name__", "")
    base = name.split(".")[0]
    return (base.endswith("_") and not base.endswith("__")) or name in _ACTS_ON_OBJECT \
        or kwargs.get("inplace") is True or "out" in kwargs


def _generators(args, kwargs) -> List[torch.Generator] | None:
    """The random generators a call on these arguments may draw from: the CPU default, the
    default of every CUDA device among the tensors, and any generator passed explicitly; None
    when a tensor lives on another kind of device (its generator is not rewound here)."""
    found = [torch.default_generator]
    for t in tensors_in((args, kwargs)):
        if t.is_cuda:
            found.append(torch.cuda.default_generators[t.device.index or 0])
        elif t.device.type not in ("cpu", "meta"):
            return None
    found += [g for g in list(args) + list(kwargs.values()) if isinstance(g, torch.Generator)]
    unique = {id(g): g for g in found}
    return list(unique.values())


def _with_tangents_of(primal_out, dual_out):
    """primal_out (a tree of tensors) with each tensor made dual with the tangent of the tensor in
    the same place of dual_out."""
    leaves, spec = tree_flatten(primal_out)
    dual_leaves, _ = tree_flatten(dual_out)
    for i, (p, d) in enumerate(zip(leaves, dual_leaves)):
        tangent = _tangent(d)
        if isinstance(p, torch.Tensor) and tangent is not None:
            leaves[i] = fwAD.make_dual(p, tangent)
    return tree_unflatten(leaves, spec)


class _BilinearTracer(decomposed_attention):
    """Sees every torch call of the forward pass; builds tangents and sinks at bilinear nodes."""

    def __init__(self, scales: Dict[str, float], static: List[torch.Tensor],
                 buffers: List[torch.Tensor] = ()):
        super().__init__()
        self.scales = scales
        self.static = WeakIdKeyDictionary()
        for t in static:
            self.static[t] = True
        self.watched: List[torch.Tensor] = []  # tensors whose ∂L/∂· is read off the backward
        self.slots: List[Slot] = []            # where it goes
        self.guarded: List[Tuple[torch.Tensor, int]] = []  # (tensor, version) not to change
        self.sinks: List[torch.Tensor] = []
        # Module buffers: a call may update them in place (BatchNorm's running statistics);
        # the run for the tangent gets copies, so they are updated once.
        self.buffers = {id(b) for b in buffers}
        # A leaf every probe hangs on, requested in the ordinary backward (gradient_probe), and
        # whether that backward is the one running: the probes read ∂L/∂Z only then.
        self.anchor = torch.zeros((), requires_grad=True)
        self.reading = False

    def call(self, func, args, kwargs):
        """A call that is not bilinear. Run on dual inputs, autograd would save those inputs
        with their tangents (a saved tensor keeps its forward gradient until the dual level
        closes): one more activation-sized set of tensors held to the end of the forward (on
        resnet32, the tangent of every conv output, kept by the BatchNorm after it). So the
        output is made twice: on the primals with autograd, which then saves primals only, and
        on detached duals without autograd, for the tangent. Random generators are rewound for
        the second run, so both draw the same (dropout masks), and module buffers are copied
        for it, so in-place updates of them (running statistics) happen once. Calls that write
        into an argument or act on the tensor object run once, on the duals, as do calls on
        devices whose generators are not handled."""
        generators = None if _runs_once(func, kwargs) else _generators(args, kwargs)
        if generators is None or all(_tangent(t) is None for t in tensors_in((args, kwargs))):
            return func(*args, **kwargs)
        states = [g.get_state() for g in generators]
        primal_out = func(*map_tensors(args, _primal), **map_tensors(kwargs, _primal))
        for generator, state in zip(generators, states):
            generator.set_state(state)

        def for_tangent(t):
            if isinstance(t, torch.Tensor) and id(t) in self.buffers:
                return t.detach().clone()
            return _detached_dual(t)
        with torch.no_grad():
            dual_out = func(*map_tensors(args, for_tangent), **map_tensors(kwargs, for_tangent))
        return _with_tangents_of(primal_out, dual_out)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = BILINEAR_RULES.get(func)
        parts = rule(args, kwargs) if rule is not None else None
        if parts is not None:  # before opening: torch.einsum is a Python-level function
            out = self._bilinear(func, args, kwargs, *parts)
        else:
            out = map_tensors(super().__torch_function__(func, types_, args, kwargs),
                              _with_constant_tangent)
        self._track_static(args, kwargs, out)
        return out

    def _is_static(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.static

    def _track_static(self, args, kwargs, out):
        outs = tensors_in(out, [])
        if not outs:
            return
        static = all(t in self.static for t in tensors_in(kwargs, tensors_in(args, [])))
        for t in outs:
            if static:
                self.static[t] = True
            elif t in self.static:
                del self.static[t]

    def _component(self, into, other) -> str:
        into_static, other_static = self._is_static(into), self._is_static(other)
        if into_static and not other_static:
            return "upstream"
        if other_static and not into_static:
            return "downstream"
        return "parallel"

    def _watch(self, tensor) -> Slot:
        """A slot that receives ∂L/∂tensor, `tensor` being one of the inputs the ordinary
        backward is asked for (its gradient is among that call's results)."""
        slot = Slot()
        self.slots.append(slot)
        self.watched.append(tensor)
        self.guarded.append((tensor, tensor._version))
        return slot

    def _probed(self, z, z_slot: Slot | None, upstream: list):
        """z passed through a gradient probe. When the ordinary backward reaches it, ∂L/∂z goes
        to z_slot (if a sink will use it) and every upstream weight term is made at once,
        ∂⟨∂L/∂z, B(Ẋ, W)⟩/∂W, into its slot; the tangent Ẋ it needed is then let go, rather
        than kept for the surrogate backward."""
        def receive(grad) -> bool:
            if not self.reading:  # a backward of the model's own, not the ordinary one
                return False
            if z_slot is not None and z_slot.uses > 0:
                z_slot.grad = grad
            for slot, transpose, x_tangent in upstream:
                slot.grad = transpose(x_tangent, grad)
            upstream.clear()
            return True
        out = gradient_probe(z, self.anchor, receive)
        self.guarded.append((out, out._version))
        return out

    def check_unchanged(self) -> None:
        """After the forward pass: a watched tensor changed in place has lost the autograd
        history whose gradient the sinks need."""
        if any(t._version != v for t, v in self.guarded):
            raise CriterionError(
                "OBA: the model's forward changes the output of a conv / linear / matmul call "
                "in place (e.g. F.relu_(x), F.relu(x, inplace=True), x += y right after the "
                "layer); make that operation out of place (in-place modules are handled)")

    def _bilinear(self, func, args, kwargs, a, b, bil, remainder):
        a_p, a_t, b_p, b_t = _primal(a), _tangent(a), _primal(b), _tangent(b)
        # (into, its primal, tangent of the other operand, term B with `into` differentiable)
        terms = [(a, a_p, b, b_t, lambda: bil(a_p, b_t)), (b, b_p, a, a_t, lambda: bil(a_t, b_p))]
        # Shortcut. A static operand that is a linear function of the parameters (a weight, a
        # view or slice of one) has tangent == value, since δθ = θ. Then the term into the other
        # operand X is B(X, W) = Z minus its additive remainder, so it costs nothing in the
        # forward pass, and its gradient w.r.t. X is this call's own contribution to ∂L/∂X,
        # Bᵀ(∂L/∂Z), which a sink re-injects. For conv / linear inputs the sink rebuilds it from
        # ∂L/∂Z when the surrogate backward needs it (TransposedSlot: one input-gradient
        # product, no stored ∂L/∂X per layer); for other calls X enters through a private alias
        # whose gradient is read off in the ordinary backward.
        same = [self._is_static(t) and _same_value(t_t, t_p)
                for t, t_p, t_t in ((a, a_p, a_t), (b, b_p, b_t))]
        alias, transposed = {}, {}
        if a is not b:
            for k, (into, into_p, other, other_t, _) in enumerate(terms):
                if same[1 - k] and into_p.requires_grad \
                        and self.scales[self._component(into, other)] != 0:
                    transpose = input_transpose(func, args, kwargs, into_p, b_p) if k == 0 \
                        else None
                    if transpose is not None:
                        transposed[id(into)] = transpose
                    else:
                        alias[id(into)] = into_p.view_as(into_p)

        def primal(t):
            return alias.get(id(t)) if id(t) in alias else _primal(t)
        z = func(*map_tensors(args, primal), **map_tensors(kwargs, primal))

        tangent = None
        z_slot = None
        upstream = []  # weight terms made from ∂L/∂Z by the probe: (slot, transpose, Ẋ)
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
                    self.sinks.append(gradient_sink(into_p, slot, scale))
                elif id(into) in transposed:
                    if z_slot is None:
                        z_slot = Slot()
                    self.sinks.append(gradient_sink(
                        into_p, TransposedSlot(z_slot, transposed[id(into)]), scale))
            elif k == 1 and into_p.requires_grad and torch.is_grad_enabled() and scale != 0 \
                    and a_t.numel() > b_p.numel() \
                    and (transpose := weight_transpose(func, args, kwargs, a_p, b_p)) is not None:
                # The term into a conv / linear weight: its value without autograd, its
                # gradient in closed form when the probe sees ∂L/∂Z (_probed). That holds a
                # weight-sized gradient instead of the input-sized tangent Ẋ until the surrogate
                # backward, so it is taken where the input is the larger of the two.
                value = bil(a_t, b_p.detach())
                slot = Slot(uses=1)
                upstream.append((slot, transpose, a_t))
                self.sinks.append(gradient_sink(into_p, slot, scale))
            else:
                term = term_fn()
                value = term.detach()
                if term.requires_grad and scale != 0:
                    if z_slot is None:
                        z_slot = Slot()
                    z_slot.uses += 1
                    self.sinks.append(gradient_sink(term, z_slot, scale))
                del term
            tangent = value if tangent is None else tangent + value
        for extra, to_output in remainder:
            extra_t = _tangent(extra)
            if extra_t is not None:
                piece = to_output(extra_t, z)
                tangent = piece.expand_as(z).clone() if tangent is None else tangent + piece
        if z_slot is not None or upstream:
            z = self._probed(z, z_slot, upstream)
        if tangent is None:
            return z
        return fwAD.make_dual(z, tangent)


# ----------------------------------------------------------------------------- public functions

def component_weights(upward_delta: float = 1.0, downward_delta: float = 1.0,
                      parallel_delta: float = 1.0) -> Dict[str, float]:
    """The factor on each component of H̃δθ that the published flags give (module docstring):
    upstream downward_delta², downstream upward_delta², parallel parallel_delta · downward_delta."""
    up, down, par = float(upward_delta), float(downward_delta), float(parallel_delta)
    return {"upstream": down * down, "downstream": up * up, "parallel": par * down}


def _oba_pass(model, inputs, targets, loss_fn, scales, need_grad):
    """One forward with tangents, the ordinary backward, the surrogate backward.
    Returns (loss, H̃δθ list, gradient list or None) over perturbed_parameters(model).
    Module backward hooks are lifted meanwhile: torch's full-hook Function has no forward-mode
    rule, and none of these backward passes is one the hooks' owners should see. In-place
    modules (ReLU(inplace=True)) run out of place: they would rewrite the products whose
    gradients the sinks read."""
    with lifted_backward_hooks(model), out_of_place_modules(model):
        return _oba_pass_unhooked(model, inputs, targets, loss_fn, scales, need_grad)


def _oba_pass_unhooked(model, inputs, targets, loss_fn, scales, need_grad):
    perturbed = perturbed_parameters(model)
    params = list(perturbed.values())
    buffers = list(model.buffers())
    static = list(model.parameters()) + buffers
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, p.detach()) for n, p in perturbed.items()}
        tracer = _BilinearTracer(scales, static + list(duals.values()), buffers)
        with tracer:
            output = torch.func.functional_call(model, duals, (inputs,))
        del duals
        tracer.check_unchanged()
        output = map_tensors(output, _primal)
        loss = loss_fn(output, targets)
        del output
    # Both backward passes run after the dual level is closed: inside it, saved tensors would
    # bring their tangents along and every backward op would also push tangents (a wasted
    # forward-over-reverse pass costing about as much again).
    # The probes fill their slots while it runs (each in its own _probed closure).
    wanted = [tracer.anchor] + tracer.watched + (params if need_grad else [])
    tracer.reading = True
    try:
        grads = torch.autograd.grad(loss, wanted, retain_graph=True, allow_unused=True) \
            if loss.requires_grad else [None] * len(wanted)
    finally:
        tracer.reading = False
    for slot, g in zip(tracer.slots, grads[1:1 + len(tracer.watched)]):
        slot.grad = g
    param_grads = list(grads[1 + len(tracer.watched):]) if need_grad else None
    del grads
    tracer.watched.clear()
    tracer.guarded.clear()
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
    """(loss, {perturbed parameter name: H̃δθ of that shape}) for one batch, δθ = θ, each
    component weighted as the flags say (`component_weights`)."""
    weights = component_weights(upward_delta, downward_delta, parallel_delta)
    loss, names, hv, _ = _oba_pass(model, inputs, targets, loss_fn, weights, False)
    return loss, dict(zip(names, hv))


def oba_batch_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                     loss_fn: Callable, delta: float = 0.0, upward_delta: float = 1.0,
                     downward_delta: float = 1.0, parallel_delta: float = 1.0) -> ScoreDict:
    """s_i = δθ_i · [H̃δθ]_i + delta · g_i θ_i for one batch, over the perturbed parameters, the
    components of H̃δθ weighted as the flags say (`component_weights`)."""
    perturbed = perturbed_parameters(model)
    weights = component_weights(upward_delta, downward_delta, parallel_delta)
    _, names, hv, grads = _oba_pass(model, inputs, targets, loss_fn, weights, delta != 0)
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

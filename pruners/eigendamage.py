"""EigenDamage: structured pruning in the Kronecker-factored eigenbasis (Wang et al., 2019).

For each conv/linear layer with K-FAC factors A (input channels; conv: spatial positions as
samples) and S (outputs), A = Q_A Λ_A Q_Aᵀ and S = Q_S Λ_S Q_Sᵀ. In torch's out × in weight
orientation the layer is re-parameterised as

    W_k = Q_S C_k Q_Aᵀ,   C_k = Q_Sᵀ W_k Q_A        (k: spatial kernel position)

(this is DESIGN.md's W = Q_A W′ Q_Sᵀ with W′ = Cᵀ). The importance of core entry (o, i) is
Θ_oi = λ_S[o] λ_A[i] Σ_k C_oik², the OBD estimate under the Fisher S ⊗ A, which is diagonal in
that basis. Summing Θ over outputs scores input eigen-directions; over inputs, output
eigen-directions. One global ranking over all layers removes the least important directions,
and every changed layer becomes an `EigenBottleneck`:

    rotate_in (1×1 conv / linear, rows = kept columns of Q_A, frozen)
    core      (the layer's k×k conv with its stride/padding/dilation, or linear, r_in → r_out)
    rotate_out (1×1 conv / linear, kept columns of Q_S, frozen, with the layer's bias)

Each layer keeps its input and output width, so no surgery on neighbours is needed. The
rotations are stored as ordinary conv/linear weights with requires_grad=False: FLOP counters
see them as conv/linear ops and count_params counts them as parameters, and fine-tuning trains
only the cores (and biases).

Running again on an already pruned network re-estimates the factors on each core and folds the
new bases into the old rotations, so a layer always stays three operations deep. The
depthwise option additionally factors the core as C_k ≈ V diag(D_k) Uᵀ (a CP decomposition
with shared bases) and turns it into a depthwise conv, with U and V folded into the rotations.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn

from .kfac import (LayerStatistics, collect_kfac_statistics, is_kfac_layer, symmetric_eigh)
from .limits import min_kept
from .registry import Batch, ScoreDict, model_device

LayerRef = Union[str, nn.Module, None]

# ALS sweeps and convergence threshold of the depthwise core's CP decomposition. On random 3×3
# cores (8 to 64 channels) 1000 sweeps give the error of the earlier hand-written ALS to 3
# digits; 100 stop up to 1 % higher.
CP_ITERATIONS = 1000
CP_TOLERANCE = 1e-10


class EigenDamageError(ValueError):
    """A pruning request EigenDamage cannot meet; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# The bottleneck module

class EigenBottleneck(nn.Module):
    """rotate_in → core → rotate_out; replaces one conv/linear layer of the same widths.

    original_in / original_out are the widths of the layer first replaced; the per-layer
    pruning cap is measured against them in every round.
    """

    def __init__(self, rotate_in: nn.Module, core: nn.Module, rotate_out: nn.Module,
                 original_in: int, original_out: int):
        super().__init__()
        self.rotate_in = rotate_in
        self.core = core
        self.rotate_out = rotate_out
        self.original_in = original_in
        self.original_out = original_out

    @property
    def depthwise(self) -> bool:
        return isinstance(self.core, nn.Conv2d) and self.core.groups > 1

    def forward(self, x):
        return self.rotate_out(self.core(self.rotate_in(x)))


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters(recurse=False):
        if p is not module.bias:
            p.requires_grad_(False)
    return module


def _rotation(matrix: torch.Tensor, conv: bool, bias: Optional[torch.Tensor] = None) -> nn.Module:
    """A fixed basis change y = matrix · x as a 1×1 conv (conv=True) or a linear layer."""
    out_dim, in_dim = matrix.shape
    has_bias = bias is not None
    if conv:
        layer = nn.Conv2d(in_dim, out_dim, 1, bias=has_bias)
        weight = matrix.reshape(out_dim, in_dim, 1, 1)
    else:
        layer = nn.Linear(in_dim, out_dim, bias=has_bias)
        weight = matrix
    layer = layer.to(device=matrix.device, dtype=matrix.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if has_bias:
            layer.bias.copy_(bias)
    return _frozen(layer)


def _core_like(template: nn.Module, weight: torch.Tensor, depthwise: bool = False) -> nn.Module:
    """A bias-free copy of `template`'s geometry carrying `weight` (out, in[, kh, kw])."""
    if isinstance(template, nn.Conv2d):
        channels_out = weight.shape[0]
        channels_in = channels_out if depthwise else weight.shape[1]
        core = nn.Conv2d(channels_in, channels_out, template.kernel_size, stride=template.stride,
                         padding=template.padding, dilation=template.dilation,
                         groups=channels_out if depthwise else 1, bias=False,
                         padding_mode=template.padding_mode)
    else:
        core = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    core = core.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        core.weight.copy_(weight)
    return core


# ---------------------------------------------------------------------------------------------
# Which layers, and their current form as (rotation in, core, rotation out)

def eigen_layers(model: nn.Module, ignored: Iterable[LayerRef] = ()) -> Dict[str, nn.Module]:
    """{name: module} of every layer EigenDamage can re-parameterise: conv (ungrouped) and
    linear layers, and existing non-depthwise bottlenecks (their parts are not listed).
    Layers inside nn.MultiheadAttention are left out."""
    skip_names = {x for x in ignored if isinstance(x, str)}
    skip_ids = {id(x) for x in ignored if isinstance(x, nn.Module)}
    found: Dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full in skip_names or id(child) in skip_ids:
                continue
            if isinstance(child, nn.MultiheadAttention):
                continue  # it reads its projections' weights directly; they must stay Linear
            if isinstance(child, EigenBottleneck):
                if not child.depthwise:
                    found[full] = child
            elif is_kfac_layer(child):
                found[full] = child
            else:
                walk(child, full + ".")
    walk(model, "")
    return found


def _measured(module: nn.Module) -> nn.Module:
    """The conv/linear whose factors are estimated: the core of a bottleneck."""
    return module.core if isinstance(module, EigenBottleneck) else module


@dataclass
class _LayerForm:
    """A layer written as W = R_out · core · R_in (R = identity for a plain layer)."""

    conv: bool
    core: torch.Tensor                  # (out, in[, kh, kw]) float64
    rotate_in: Optional[torch.Tensor]   # (in, width_in) or None for identity
    rotate_out: Optional[torch.Tensor]  # (width_out, out) or None for identity
    bias: Optional[torch.Tensor]
    template: nn.Module                 # the conv/linear whose geometry the core keeps
    original_in: int
    original_out: int
    params: int                         # current parameter count


def _layer_form(module: nn.Module) -> _LayerForm:
    layer = _measured(module)
    conv = isinstance(layer, nn.Conv2d)
    params = sum(p.numel() for p in module.parameters())
    if isinstance(module, EigenBottleneck):
        r_in = module.rotate_in.weight.detach().reshape(module.rotate_in.weight.shape[:2])
        r_out = module.rotate_out.weight.detach().reshape(module.rotate_out.weight.shape[:2])
        bias = module.rotate_out.bias
        return _LayerForm(conv, layer.weight.detach().double(), r_in.double(), r_out.double(),
                          None if bias is None else bias.detach(), layer,
                          module.original_in, module.original_out, params)
    width_in = layer.in_channels if conv else layer.in_features
    width_out = layer.out_channels if conv else layer.out_features
    bias = layer.bias
    return _LayerForm(conv, layer.weight.detach().double(), None, None,
                      None if bias is None else bias.detach(), layer, width_in, width_out, params)


# ---------------------------------------------------------------------------------------------
# Statistics and the eigenbasis

@dataclass
class EigenLayer:
    """One layer in its K-FAC eigenbasis."""

    Q_A: torch.Tensor          # (in, in) eigenvectors of A, columns
    Q_S: torch.Tensor          # (out, out) eigenvectors of S, columns
    core: torch.Tensor         # C = Q_Sᵀ W Q_A per kernel position: (out, in[, kh, kw])
    importance: torch.Tensor   # Θ (out, in) = λ_S λ_Aᵀ ⊙ Σ_k C_k²
    in_scores: torch.Tensor    # (in,)  Θ summed over outputs
    out_scores: torch.Tensor   # (out,) Θ summed over inputs


@dataclass
class EigenStatistics:
    """Factors of every layer of one network, keyed by the layer's qualified name."""

    layers: Dict[str, LayerStatistics]
    seconds: float = 0.0
    _bases: Dict[str, EigenLayer] = field(default_factory=dict, repr=False)

    def eigenbasis(self, name: str, module: nn.Module) -> EigenLayer:
        """The layer `name` (whose current weights are in `module`) in its eigenbasis; cached."""
        if name not in self._bases:
            self._bases[name] = _eigen_layer(self.layers[name], _layer_form(module).core)
        return self._bases[name]


def _eigen_layer(stats: LayerStatistics, weight: torch.Tensor) -> EigenLayer:
    lam_a, q_a = symmetric_eigh(stats.A_channels)
    lam_s, q_s = symmetric_eigh(stats.S)
    q_a, q_s = q_a.to(weight.device), q_s.to(weight.device)
    if weight.dim() == 4:
        core = torch.einsum("os,oikl,ia->sakl", q_s, weight, q_a)
        energy = core.pow(2).sum((2, 3))
    else:
        core = q_s.t() @ weight @ q_a
        energy = core.pow(2)
    theta = energy * torch.outer(lam_s.to(weight.device), lam_a.to(weight.device))
    return EigenLayer(q_a, q_s, core, theta, theta.sum(0), theta.sum(1))


def collect_eigen_statistics(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                             fisher_type: str = "true", ignored: Iterable[LayerRef] = ()
                             ) -> EigenStatistics:
    """K-FAC factors (A over input channels, S over outputs) of every layer EigenDamage can
    re-parameterise; for bottlenecks, of their cores. Leaves the model as it was."""
    start = time.perf_counter()
    layers = {name: _measured(m) for name, m in eigen_layers(model, ignored).items()}
    stats = collect_kfac_statistics(model, batches, loss_fn, fisher_type=fisher_type,
                                    layers=layers, full_input=False, channel_input=True)
    device = model_device(model)
    if device.type == "cuda":  # the kernels are asynchronous: wait for them before reading the clock
        torch.cuda.synchronize(device)
    return EigenStatistics(stats, time.perf_counter() - start)


def eigen_parameter_scores(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                           fisher_type: str = "true") -> ScoreDict:
    """Per-weight EigenDamage scores for `parameter_scores("Eigen", ...)`.

    Θ lives in eigen-coordinates, which have no per-weight counterpart; what is returned is the
    same quadratic form written in weight space, s = W ⊙ (S W_k A) per kernel position k
    (A over input channels). Its total over a layer equals ΣΘ, and its sum over a filter is
    that filter's share of it. Bottleneck layers are scored on their core weights.
    """
    stats = collect_eigen_statistics(model, batches, loss_fn, fisher_type=fisher_type)
    modules = dict(model.named_modules())
    scores: ScoreDict = {}
    for name, st in stats.layers.items():
        module = modules[name]
        layer = _measured(module)
        w = layer.weight.detach()
        a, s = st.A_channels.to(w.dtype), st.S.to(w.dtype)
        if w.dim() == 4:
            form = torch.einsum("so,oikl,ia->sakl", s, w, a)  # S W_k A
        else:
            form = s @ w @ a
        key = f"{name}.core.weight" if isinstance(module, EigenBottleneck) else f"{name}.weight"
        scores[key] = w * form
    return scores


# ---------------------------------------------------------------------------------------------
# Pruning

def _resolve_name(model: nn.Module, ref: LayerRef) -> Optional[str]:
    if ref is None:
        return None
    if isinstance(ref, str):
        return ref
    for name, m in model.named_modules():
        if m is ref:
            return name
    raise EigenDamageError("the classifier module given is not part of the model; "
                           "pass the model's own classifier module or its name")


def default_classifier(model: nn.Module) -> Optional[str]:
    """The last layer EigenDamage would touch, assumed to produce the network's outputs."""
    names = list(eigen_layers(model))
    return names[-1] if names else None


def _check_cp_rank(cp_rank: Optional[int]) -> None:
    if cp_rank is not None and cp_rank < 1:
        raise EigenDamageError(f"--cp_rank must be at least 1 (got {cp_rank}); leave it out for "
                               "the larger of each core's kept input and output directions")


def _check_ratios(prune_ratio: float, max_pruning_ratio: float) -> None:
    if not 0.0 <= prune_ratio <= 1.0:
        raise EigenDamageError(f"prune ratio must lie in [0, 1] (got {prune_ratio})")
    if not 0.0 < max_pruning_ratio < 1.0:
        raise EigenDamageError(
            f"--max_pruning_ratio must lie in (0, 1) (got {max_pruning_ratio}); e.g. 0.95")


class _PrunePlan:
    """Everything about a network's pruning that does not depend on the ratio."""

    def __init__(self, model: nn.Module, stats: EigenStatistics, classifier: Optional[str],
                 max_pruning_ratio: float):
        modules = dict(model.named_modules())
        self.layers: Dict[str, Tuple[EigenLayer, _LayerForm]] = {}
        scores, layer_ids, sides, indices = [], [], [], []
        for layer_id, name in enumerate(sorted(stats.layers)):
            if name not in modules:
                raise EigenDamageError(f"the statistics name a layer '{name}' that the model "
                                       "lacks; collect them on this model")
            module = modules[name]
            basis = stats.eigenbasis(name, module)
            self.layers[name] = (basis, _layer_form(module))
            for side, values in (("in", basis.in_scores), ("out", basis.out_scores)):
                if side == "out" and name == classifier:
                    continue  # the network's outputs are never pruned
                scores.append(values.double().cpu())
                layer_ids.append(torch.full((len(values),), layer_id))
                sides.append(torch.full((len(values),), 0 if side == "in" else 1))
                indices.append(torch.arange(len(values)))
        self.names = sorted(stats.layers)
        self.max_pruning_ratio = max_pruning_ratio
        if scores:
            self.scores = torch.cat(scores)
            # Ascending by score; ties broken by position, so the order is deterministic.
            self.order = torch.argsort(self.scores, stable=True)
            self.layer_ids, self.sides, self.indices = (torch.cat(layer_ids), torch.cat(sides),
                                                        torch.cat(indices))
        else:
            self.scores = torch.zeros(0)
            self.order = self.layer_ids = self.sides = self.indices = torch.zeros(0, dtype=torch.long)

    @property
    def total(self) -> int:
        return len(self.scores)

    def kept(self, n_remove: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (kept input directions, kept output directions)} after removing the
        n_remove lowest-scored directions, each layer capped at max_pruning_ratio."""
        removed = torch.zeros(self.total, dtype=torch.bool)
        removed[self.order[:n_remove]] = True
        result = {}
        for layer_id, name in enumerate(self.names):
            basis, form = self.layers[name]
            keep = []
            for side, values, original in ((0, basis.in_scores, form.original_in),
                                           (1, basis.out_scores, form.original_out)):
                mask = torch.ones(len(values), dtype=torch.bool)
                sel = (self.layer_ids == layer_id) & (self.sides == side) & removed
                mask[self.indices[sel]] = False
                floor = min(len(values), min_kept(original, self.max_pruning_ratio))
                if int(mask.sum()) < floor:  # cap: keep the best `floor` directions
                    best = torch.argsort(values.double().cpu(), descending=True, stable=True)
                    mask[best[:floor]] = True
                keep.append(torch.nonzero(mask).flatten())
            result[name] = (keep[0], keep[1])
        return result


def _bottleneck_params(form: _LayerForm, r_in: int, r_out: int, width_in: int,
                       width_out: int, kernel: int) -> int:
    bias = 0 if form.bias is None else width_out
    return r_in * width_in + r_out * r_in * kernel + width_out * r_out + bias


def _build(basis: EigenLayer, form: _LayerForm, keep_in: torch.Tensor, keep_out: torch.Tensor,
           depthwise: bool, cp_rank: Optional[int], allow_growth: bool,
           exact: bool = True) -> Optional[nn.Module]:
    """The bottleneck for one layer, or None to leave the layer as it is. exact=False skips
    the CP decomposition (zero depthwise factors of the right shapes), for counting MACs."""
    device = form.core.device
    keep_in, keep_out = keep_in.to(device), keep_out.to(device)
    q_a = basis.Q_A[:, keep_in]                     # (in, r_in)
    q_s = basis.Q_S[:, keep_out]                    # (out, r_out)
    core = basis.core[keep_out][:, keep_in]         # (r_out, r_in[, kh, kw])
    # Fold the existing rotations (identity for a plain layer).
    rot_in = q_a.t() if form.rotate_in is None else q_a.t() @ form.rotate_in
    rot_out = q_s if form.rotate_out is None else form.rotate_out @ q_s
    width_in, width_out = rot_in.shape[1], rot_out.shape[0]
    kernel = core[0, 0].numel()
    plain_params = _bottleneck_params(form, len(keep_in), len(keep_out), width_in, width_out, kernel)

    if depthwise and form.conv:
        rank = cp_rank if cp_rank is not None else max(len(keep_in), len(keep_out))
        dw_params = rank * width_in + rank * kernel + width_out * rank + (
            0 if form.bias is None else width_out)
        if allow_growth or (dw_params <= plain_params and dw_params <= form.params):
            if exact:
                out_f, in_f, kern_f = cp_decompose(core.reshape(core.shape[0], core.shape[1], -1), rank)
            else:
                out_f, in_f, kern_f = (core.new_zeros(n, rank) for n in (core.shape[0], core.shape[1], kernel))
            dw_weight = kern_f.t().reshape(rank, 1, *core.shape[2:])
            return _assemble(in_f.t() @ rot_in, dw_weight, rot_out @ out_f, form, depthwise=True)

    if plain_params > form.params and not allow_growth:
        return None
    return _assemble(rot_in, core, rot_out, form, depthwise=False)


def _assemble(rot_in: torch.Tensor, core: torch.Tensor, rot_out: torch.Tensor, form: _LayerForm,
              depthwise: bool) -> EigenBottleneck:
    dtype = form.template.weight.dtype
    bias = None if form.bias is None else form.bias.to(dtype)
    return EigenBottleneck(_rotation(rot_in.to(dtype), form.conv),
                           _core_like(form.template, core.to(dtype), depthwise),
                           _rotation(rot_out.to(dtype), form.conv, bias),
                           form.original_in, form.original_out)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _apply(model: nn.Module, plan: _PrunePlan, n_remove: int, depthwise: bool,
           cp_rank: Optional[int], allow_growth: bool, exact: bool = True) -> nn.Module:
    pruned = copy.deepcopy(model)
    for name, (keep_in, keep_out) in plan.kept(n_remove).items():
        basis, form = plan.layers[name]
        unchanged = len(keep_in) == len(basis.in_scores) and len(keep_out) == len(basis.out_scores)
        if unchanged and form.rotate_in is not None and not depthwise:
            continue  # an existing bottleneck with nothing removed: already in its best form
        module = _build(basis, form, keep_in, keep_out, depthwise, cp_rank, allow_growth, exact)
        if module is not None:
            old = pruned.get_submodule(name)
            module.train(old.training)
            _replace(pruned, name, module)
    return pruned


def eigendamage_prune(model: nn.Module, stats: EigenStatistics, prune_ratio: float,
                      max_pruning_ratio: float = 0.95, classifier: LayerRef = None,
                      depthwise: bool = False, cp_rank: Optional[int] = None,
                      allow_growth: bool = False) -> nn.Module:
    """A new network with the `prune_ratio` fraction of lowest-scored eigen-directions (over
    all layers, inputs and outputs) removed; `model` is left untouched.

    classifier: the output layer (module or name; default: the last conv/linear layer); its
        outputs are never pruned, its inputs may be.
    max_pruning_ratio: no layer loses more than this fraction of its original directions.
    depthwise: factor conv cores into depthwise convs (CP rank `cp_rank`, default
        max(r_in, r_out)); used only where it saves parameters over both the layer and the
        plain bottleneck.
    allow_growth: build the (depthwise, if asked) bottleneck even where it has more
        parameters than the layer.
    """
    _check_ratios(prune_ratio, max_pruning_ratio)
    _check_cp_rank(cp_rank)
    name = _resolve_name(model, classifier) if classifier is not None else default_classifier(model)
    plan = _PrunePlan(model, stats, name, max_pruning_ratio)
    n_remove = int(round(prune_ratio * plan.total))
    return _apply(model, plan, n_remove, depthwise, cp_rank, allow_growth)


def prune_to_macs_target(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                         example_inputs: torch.Tensor, target_ops_ratio: float,
                         max_pruning_ratio: float = 0.95, classifier: LayerRef = None,
                         fisher_type: str = "true", depthwise: bool = False,
                         tolerance: float = 0.0, cp_rank: Optional[int] = None,
                         macs_counter: Optional[Callable] = None,
                         params_counter: Optional[Callable] = None) -> Tuple[nn.Module, dict]:
    """Prune until MACs(pruned) / MACs(model) ≤ target_ops_ratio, as close to it as possible.

    Statistics are collected once; the global prune ratio is then found by bisection over the
    number of removed directions (MACs fall as more directions go). tolerance: accept a ratio
    within this fraction of all directions above the smallest sufficient one (0: exact).
    Raises EigenDamageError when even the largest allowed pruning misses the target.
    Returns (pruned model, info) with info keys prune_ratio, removed_directions,
    total_directions, macs_before, macs_after, params_before, params_after, ops_ratio,
    seconds_estimating, seconds_searching.
    """
    if macs_counter is None or params_counter is None:
        from utils.flops import count_macs, count_params
        macs_counter = macs_counter or count_macs
        params_counter = params_counter or count_params
    if not 0.0 < target_ops_ratio <= 1.0:
        raise EigenDamageError(f"the FLOPs target must lie in (0, 1] (got {target_ops_ratio})")
    _check_ratios(0.0, max_pruning_ratio)
    _check_cp_rank(cp_rank)
    name = _resolve_name(model, classifier) if classifier is not None else default_classifier(model)
    stats = collect_eigen_statistics(model, batches, loss_fn, fisher_type=fisher_type)
    start = time.perf_counter()
    plan = _PrunePlan(model, stats, name, max_pruning_ratio)
    macs_before = macs_counter(model, example_inputs)

    cache: Dict[int, int] = {}

    def attempt(n: int) -> int:
        """MACs after removing n directions (shapes only: no CP decomposition needed)."""
        if n not in cache:
            candidate = _apply(model, plan, n, depthwise, cp_rank, allow_growth=False, exact=False)
            cache[n] = macs_counter(candidate, example_inputs)
        return cache[n]

    def fits(macs: int) -> bool:
        return macs <= target_ops_ratio * macs_before

    most_macs = attempt(plan.total)
    if not fits(most_macs):
        raise EigenDamageError(
            f"EigenDamage reached only {most_macs / macs_before:.4f} of the MACs (target "
            f"{target_ops_ratio}) at max_pruning_ratio {max_pruning_ratio}; raise "
            "--max_pruning_ratio or lower the target")
    if fits(attempt(0)):
        best_n = 0
    else:
        # Invariant: removing `lo` directions misses the target, removing `hi` meets it.
        lo, hi = 0, plan.total
        slack = max(1, int(tolerance * plan.total))
        while hi - lo > slack:
            mid = (lo + hi) // 2
            if fits(attempt(mid)):
                hi = mid
            else:
                lo = mid
        best_n = hi
    best = _apply(model, plan, best_n, depthwise, cp_rank, allow_growth=False)
    best_macs = macs_counter(best, example_inputs)
    info = {
        "prune_ratio": best_n / plan.total if plan.total else 0.0,
        "removed_directions": best_n,
        "total_directions": plan.total,
        "macs_before": int(macs_before),
        "macs_after": int(best_macs),
        "params_before": int(params_counter(model)),
        "params_after": int(params_counter(best)),
        "ops_ratio": best_macs / macs_before,
        "seconds_estimating": stats.seconds,
        "seconds_searching": time.perf_counter() - start,
    }
    return best, info


# ---------------------------------------------------------------------------------------------
# CP decomposition for the depthwise core

def cp_decompose(tensor: torch.Tensor, rank: int, n_iter_max: int = CP_ITERATIONS,
                 tol: float = CP_TOLERANCE) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CP/PARAFAC of a 3-way tensor with tensorly's ALS (PyTorch backend, float64, on the
    tensor's device): tensor[o, i, k] ≈ Σ_r V[o, r] U[i, r] D[k, r]. Returns (V, U, D).

    Deterministic: SVD initialisation, and the columns beyond a mode's size (rank larger than
    that mode) drawn from a fixed seed. Stops after `n_iter_max` sweeps or when the relative
    reconstruction error changes by less than `tol` in one sweep."""
    import tensorly as tl  # imported on use: only depthwise EigenDamage needs it
    from tensorly.decomposition import parafac
    if rank < 1:
        raise EigenDamageError(f"the CP rank must be at least 1 (got {rank}); pass --cp_rank >= 1")
    x = tensor.double()
    if not torch.any(x):  # nothing to fit (and ALS would divide by the zero norm)
        return tuple(tensor.new_zeros(n, rank) for n in tensor.shape)
    # The backend is set for this call only; whatever the caller uses stays in place.
    with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        # rank > a mode's size is expected here: that mode's extra columns start random
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, (v, u, d) = parafac(x, rank, n_iter_max=n_iter_max, init="svd", tol=tol,
                                     random_state=0)
    v = v * weights  # all ones without normalisation; folded in so the product is exact anyway
    return v.to(tensor.dtype), u.to(tensor.dtype), d.to(tensor.dtype)

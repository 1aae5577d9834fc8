"""The K-FAC pruning criteria of the EigenDamage paper: C-OBD, C-OBS, Kron-OBD, Kron-OBS
(and the registry entry of EigenDamage itself, whose structured path lives in eigendamage.py).

Every criterion returns per-parameter scores in θ = [W.view(out, -1) | b] layout (see kfac.py),
split back into '<layer>.weight' / '<layer>.bias'. A filter's score is the sum of its row, which
is what the structured driver computes when it folds scores per output channel:

    C-OBD     s = θ² ⊙ F_diag                         (per-example-gradient diagonal Fisher)
    C-OBS     s = θ² / diag(S⁻¹ ⊗ A⁻¹)                (damped factors)
    Kron-OBD  s_ij = ½ S_ii θ_ij (Aθ_i)_j             row sum: ½ S_ii θ_iᵀAθ_i
    Kron-OBS  s_ij = ½ θ_ij (Aθ_i)_j / [S⁻¹]_ii       row sum: ½ θ_iᵀAθ_i / [S⁻¹]_ii

Kron-OBS also updates the surviving filters when a set P is removed (the joint OBS step under
F = S ⊗ A): ΔΘ = −S⁻¹[:, P] ([S⁻¹]_PP)⁻¹ Θ_P.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterable, Sequence

import torch
import torch.nn as nn

from utils.log import warn_once

from .kfac import (LayerStatistics, collect_kfac_statistics, damped, damping_shift,
                   matrix_to_parameters, named_matrix_scores, spd_inverse,
                   spd_inverse_diagonal, weight_matrix)
from .registry import (DEFAULT_SCORE_MODE, Batch, CriterionError, Method, ScoreDict,
                       check_score_mode, preserved_state, register)

OPTIONS = ("fisher_type", "damping", "obs_update")
DEFAULT_DAMPING = 1e-3


def _check_damping(damping: float) -> None:
    if not damping > 0:
        raise CriterionError(f"damping must be positive (got {damping}); try 1e-3")


def _layer_scores(model: nn.Module, stats: Dict[str, LayerStatistics],
                  score: Callable[[str, torch.Tensor, LayerStatistics], torch.Tensor]) -> ScoreDict:
    modules = dict(model.named_modules())
    result: ScoreDict = {}
    with torch.no_grad():
        for name, st in stats.items():
            module = modules[name]
            theta = weight_matrix(module).detach()
            matrix = score(name, theta.to(st.S.dtype), st).to(theta.dtype)
            result.update(named_matrix_scores(name, module, matrix))
    return result


def warn_undersampled_input_factors(stats: Dict[str, LayerStatistics]) -> None:
    """Say once when a layer's A has fewer sample rows than columns. A is then singular, so in
    most coordinates diag(A⁻¹) is 1/(damping shift), not a property of the data: C-OBS then
    scores that layer's channels by damping × weight magnitude while the other layers get their
    curvature (digits vgg19, 2 batches of 64 per step, 0.5 of the MACs: the last conv kept 7 % of
    its channels; with 20 batches, 27 %). Layers that are not pruned (a classifier, whose rows
    are one per image) are harmless, so the message says which layer is worst."""
    short = {name: st for name, st in stats.items()
             if st.A is not None and 0 < st.input_samples < st.A.shape[-1]}
    if not short:
        return
    worst = max(short, key=lambda name: short[name].A.shape[-1] / short[name].input_samples)
    st = short[worst]
    # Images needed for as many sample rows as columns, at this layer's rows per image.
    needed = math.ceil(st.A.shape[-1] * st.examples / st.input_samples)
    warn_once("c-obs-undersampled",
              f"C-OBS: {len(short)} of {len(stats)} layers have fewer input samples than their "
              f"factor A has columns (worst: {worst}, {st.input_samples} rows for "
              f"{st.A.shape[-1]} columns), so the damping, not the data, sets their scores; "
              f"unless those layers are left unpruned (e.g. the classifier), estimate on at least "
              f"{needed} images per pruning step (now {st.examples}: raise --iters_per_step)")


# ---------------------------------------------------------------------------------------------
# Criteria

def c_obd_scores(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                 fisher_type: str = "true", damping: float = DEFAULT_DAMPING,
                 obs_update: bool = True) -> ScoreDict:
    """θ² ⊙ diag(F), the diagonal taken from per-example gradients."""
    stats = collect_kfac_statistics(model, batches, loss_fn, fisher_type=fisher_type,
                                    full_input=False, diagonal=True)
    return _layer_scores(model, stats, lambda _, theta, st: theta.pow(2) * st.fisher_diag)


def c_obs_scores(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                 fisher_type: str = "true", damping: float = DEFAULT_DAMPING,
                 obs_update: bool = True) -> ScoreDict:
    """θ² / [F⁻¹]_diag with F⁻¹ = S⁻¹ ⊗ A⁻¹ of the damped factors."""
    _check_damping(damping)
    stats = collect_kfac_statistics(model, batches, loss_fn, fisher_type=fisher_type)
    warn_undersampled_input_factors(stats)

    def score(_, theta, st):
        s_inv = spd_inverse_diagonal(damped(st.S, damping))
        a_inv = spd_inverse_diagonal(damped(st.A, damping))
        return theta.pow(2) / torch.outer(s_inv, a_inv)
    return _layer_scores(model, stats, score)


def kron_obd_scores(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                    fisher_type: str = "true", damping: float = DEFAULT_DAMPING,
                    obs_update: bool = True) -> ScoreDict:
    """s_ij = ½ S_ii θ_ij (Aθ_i)_j; no inverse, so the undamped factors are used."""
    stats = collect_kfac_statistics(model, batches, loss_fn, fisher_type=fisher_type,
                                    full_input=False, weight_products=True)

    def score(_, theta, st):
        return 0.5 * torch.diagonal(st.S).unsqueeze(1) * theta * st.theta_A
    return _layer_scores(model, stats, score)


def kron_obs_scores(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                    fisher_type: str = "true", damping: float = DEFAULT_DAMPING,
                    obs_update: bool = True) -> ScoreDict:
    """s_ij = ½ θ_ij (A θ_i)_j / [S⁻¹]_ii of the damped factors; keeps S⁻¹ per layer in
    KRON_OBS.state for the compensating update."""
    _check_damping(damping)
    stats = collect_kfac_statistics(model, batches, loss_fn, fisher_type=fisher_type,
                                    full_input=False, weight_products=True)
    inverses: Dict[str, torch.Tensor] = {}

    def score(name, theta, st):
        s_inv = spd_inverse(damped(st.S, damping))
        inverses[name] = s_inv
        theta_a_damped = st.theta_A + damping_shift(st.A_diagonal_mean, damping) * theta
        return 0.5 * theta * theta_a_damped / torch.diagonal(s_inv).unsqueeze(1)
    scores = _layer_scores(model, stats, score)
    KRON_OBS.state.clear()
    KRON_OBS.state.update(S_inverse=inverses, obs_update=bool(obs_update))
    return scores


# ---------------------------------------------------------------------------------------------
# OBS compensation

def obs_removal_update(values: torch.Tensor, inverse: torch.Tensor,
                       removed: Sequence[int]) -> torch.Tensor:
    """The joint OBS step for removing the rows `removed` of `values` (n × m, or a vector)
    under curvature with inverse `inverse` (n × n) acting on the row index:
    Δ = −inverse[:, P] (inverse[P, P])⁻¹ values[P]. Rows in P become exactly zero."""
    vector = values.dim() == 1
    v = values.unsqueeze(1) if vector else values
    p = torch.as_tensor(list(removed), dtype=torch.long, device=values.device)
    inv = inverse.to(v.dtype)
    delta = -inv[:, p] @ torch.linalg.solve(inv[p][:, p], v[p])
    return delta.squeeze(1) if vector else delta


def apply_obs_update(module: nn.Module, s_inverse: torch.Tensor, removed: Sequence[int]) -> None:
    """Kron-OBS: move the surviving filters of `module` to absorb removing filters `removed`."""
    with torch.no_grad():
        theta = weight_matrix(module)
        new = theta + obs_removal_update(theta.double(), s_inverse.double(), removed).to(theta.dtype)
        new[list(removed)] = 0  # exactly zero, not round-off
        weight, bias = matrix_to_parameters(module, new)
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)


def kron_obs_compensate(model: nn.Module, plan: Dict[nn.Module, Sequence[int]], state: dict) -> None:
    """Method.compensate of Kron-OBS: apply the OBS update to every layer in `plan`."""
    if not state.get("obs_update", True) or not plan:
        return
    inverses = state.get("S_inverse", {})
    names = {id(m): n for n, m in model.named_modules()}
    for module, removed in plan.items():
        removed = list(removed)
        name = names.get(id(module))
        if not removed or name not in inverses:
            continue
        s_inv = inverses[name]
        if s_inv.shape[0] != module.weight.shape[0]:
            warnings.warn(f"Kron-OBS: layer {name} changed width since its factors were "
                          "estimated; its filters are not compensated")
            continue
        apply_obs_update(module, s_inv, removed)


# ---------------------------------------------------------------------------------------------
# The EigenDamage paper's three-weight example, as a reusable check of the OBD/OBS formulas

def obd_obs_loss_change(theta: torch.Tensor, hessian: torch.Tensor, count: int) -> dict:
    """Remove `count` weights of a quadratic loss L(θ+δ) − L(θ) = ½ δᵀHδ (θ at a minimum)
    once by OBD and once by OBS, and return each choice with its true loss change.

    OBD removes the `count` smallest ½ H_ii θ_i² and leaves the rest alone.
    OBS removes the `count` smallest ½ θ_i² / [H⁻¹]_ii and applies the joint OBS update.
    """
    theta, hessian = theta.double(), hessian.double()
    inverse = torch.linalg.inv(hessian)
    obd_saliency = 0.5 * torch.diagonal(hessian) * theta ** 2
    obs_saliency = 0.5 * theta ** 2 / torch.diagonal(inverse)
    obd_removed = sorted(torch.argsort(obd_saliency, stable=True)[:count].tolist())
    obs_removed = sorted(torch.argsort(obs_saliency, stable=True)[:count].tolist())

    def loss_change(delta):
        return float(0.5 * delta @ hessian @ delta)

    obd_delta = torch.zeros_like(theta)
    obd_delta[obd_removed] = -theta[obd_removed]
    obs_delta = obs_removal_update(theta, inverse, obs_removed)
    return {"obd_removed": obd_removed, "obd_loss_change": loss_change(obd_delta),
            "obs_removed": obs_removed, "obs_loss_change": loss_change(obs_delta)}


# ---------------------------------------------------------------------------------------------
# Registry

def _eigen_estimate(model, batches, loss_fn, **options):
    from .eigendamage import eigen_parameter_scores  # heavier module, imported on use
    return eigen_parameter_scores(model, batches, loss_fn, **options)


def _eigen_prune(model, batches, loss_fn, example_inputs, target_ratio,
                 score_mode=DEFAULT_SCORE_MODE, **options):
    from .eigendamage import prune_to_macs_target
    check_score_mode(score_mode)
    with preserved_state(model):  # the factors are estimated in `score_mode`
        model.train(score_mode == "train")
        return prune_to_macs_target(model, batches, loss_fn, example_inputs, target_ratio,
                                    **options)


C_OBD = register(Method("C-OBD", c_obd_scores, in_channels=False, options=OPTIONS,
                        description="w² · diagonal Fisher (per-example gradients)"))
C_OBS = register(Method("C-OBS", c_obs_scores, in_channels=False, options=OPTIONS,
                        description="w² / diag(S⁻¹ ⊗ A⁻¹) of the K-FAC factors"))
KRON_OBD = register(Method("Kron-OBD", kron_obd_scores, in_channels=False, options=OPTIONS,
                           description="filter: ½ S_ii θ_iᵀ A θ_i"))
KRON_OBS = register(Method("Kron-OBS", kron_obs_scores, in_channels=False, options=OPTIONS,
                           compensate=kron_obs_compensate,
                           description="filter: ½ θ_iᵀ A θ_i / [S⁻¹]_ii, with the OBS update"))
EIGEN = register(Method("Eigen", _eigen_estimate, in_channels=False, options=("fisher_type",),
                        prune_to_target=_eigen_prune,
                        prune_options=("fisher_type", "depthwise", "cp_rank", "score_mode"),
                        description="EigenDamage; structured pruning re-parameterises layers "
                                    "(pruners.eigendamage.prune_to_macs_target)"))

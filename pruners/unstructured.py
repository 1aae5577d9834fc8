"""Unstructured and semi-structured (N:M) weight sparsity: per-weight scores, masks, export.

The pieces `train_unstructured_prune.py` is made of:

  prunable_weights   conv / linear weights (and packed attention projections) that may be zeroed
                     (the classifier only if asked; biases and normalisation parameters never)
  weight_scores      per-weight score = |mean over batches of the criterion's s_i|, normalised per
                     layer over the weights still kept, zero for weights already removed
  global_masks       one global threshold keeping exactly round(density * total) weights, with a
                     per-layer floor (--max_layer_sparsity) and deterministic tie-breaking
  nm_masks           N:M: in every group of M consecutive weights along the input dimension, the N
                     best-scored are kept (2:4 is what GPU sparse tensor cores accelerate)
  apply_masks / remove_masks   torch.nn.utils.prune parametrisation (masks stay in force through
                     optimiser steps) and folding it back into plain weights
  export_sparse / import_sparse   bitmask + kept values in a .npz, and back

Masks are monotone: a weight removed at one step is never brought back (its score is ignored).
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from utils.checkpoint import _atomic_write

from .group_scores import NORMALIZERS, normalize
from .registry import parameter_scores

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
Masks = Dict[str, torch.Tensor]


class SparsityError(ValueError):
    """Bad sparsity request (pattern, ratio, unreachable target); one line for the user."""


# ----------------------------------------------------------------------------- what is pruned

def parse_pattern(text: str) -> Optional[Tuple[int, int]]:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if text == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if match is None:
        raise SparsityError(f"--pattern '{text}' is not understood; give 'unstructured' or N:M "
                            "such as 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise SparsityError(f"--pattern {n}:{m} needs 0 < N < M (N weights kept of every M), "
                            "e.g. 2:4")
    return n, m


def pattern_tag(pattern: Optional[Tuple[int, int]]) -> str:
    return "unstructured" if pattern is None else f"{pattern[0]}of{pattern[1]}"


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable weight tensor: `module.<attr>`. `owner` is the nn.MultiheadAttention whose
    forward reads it without calling `module` (its out_proj), so the mask must be refreshed there."""

    module: nn.Module
    attr: str = "weight"
    owner: Optional[nn.Module] = None

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


Targets = Dict[str, Target]


def prunable_weights(model: nn.Module, classifier: Optional[nn.Module] = None,
                     prune_classifier: bool = False) -> Targets:
    """{parameter name: Target} of every conv / linear weight (and the packed in_proj_weight of
    nn.MultiheadAttention), in module order; the classifier only with `prune_classifier`."""
    owners = {id(c): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)
              for c in m.children()}
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            out[prefix + "in_proj_weight"] = Target(module, "in_proj_weight")
        if not isinstance(module, PRUNABLE_TYPES) or (module is classifier and not prune_classifier):
            continue
        out[prefix + "weight"] = Target(module, "weight", owners.get(id(module)))
    return out


# ----------------------------------------------------------------------------- scores

def all_kept(targets: Targets) -> Masks:
    return {n: torch.ones_like(t.tensor, dtype=torch.bool) for n, t in targets.items()}


def weight_scores(method: str, model: nn.Module, targets: Targets, masks: Masks,
                  batches: Iterable, loss_fn=None, normalizer: str = "max",
                  options: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Per-weight scores of every prunable layer, estimated afresh on `batches`.

    The model must be plain (no prune parametrisation) with removed weights already zero. The
    criterion's per-parameter mean over batches is taken in absolute value, normalised per layer
    over the weights still kept, and is exactly zero where the mask is zero.
    """
    if normalizer not in NORMALIZERS:
        normalize(torch.ones(1), normalizer)  # raises the one-line error
    raw = parameter_scores(method, model, batches, criterion=loss_fn, **(options or {}))
    out = {}
    for name in targets:
        s = raw.get(name)
        if s is None:
            raise SparsityError(f"criterion {method} gives no score for {name}; "
                                "choose another --importance_type")
        s = s.detach().abs().float()
        keep = masks[name].to(s.device)
        norm = torch.zeros_like(s)
        if keep.any():
            norm[keep] = normalize(s[keep], normalizer)
        out[name] = norm
    return out


# ----------------------------------------------------------------------------- mask selection

def layer_floor(numel: int, max_layer_sparsity: float) -> int:
    """Weights a layer keeps at least: no layer is emptied."""
    return max(1, math.ceil(round((1.0 - max_layer_sparsity) * numel, 6)))


def keep_count(density: float, total: int) -> int:
    return int(round(density * total))


def check_reachable(sizes: List[int], density: float, max_layer_sparsity: float) -> None:
    """A density below the per-layer floors cannot be met: say so before any work."""
    floor = sum(layer_floor(n, max_layer_sparsity) for n in sizes)
    if floor > keep_count(density, sum(sizes)):
        raise SparsityError(f"density {density:g} is below what --max_layer_sparsity "
                            f"{max_layer_sparsity:g} allows ({floor / sum(sizes):.4g}); keep more "
                            "weights or raise --max_layer_sparsity")


def _stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k entries of a 1-D tensor: every value above the k-th largest, then
    the earliest (by index) of those equal to it. Deterministic, O(n) memory."""
    n = values.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k <= 0:
        return keep
    if k >= n:
        return ~keep
    kth = torch.kthvalue(values, n - k + 1).values
    keep = values > kth
    tied = values == kth
    need = k - int(keep.sum())
    keep |= tied & (torch.cumsum(tied.to(torch.int64), 0) <= need)
    return keep


def global_masks(scores: Dict[str, torch.Tensor], masks: Masks, density: float,
                 max_layer_sparsity: float = 0.99) -> Masks:
    """Keep exactly round(density * total) weights over all layers (never one already removed).

    Each layer first keeps its highest-scored `layer_floor` weights; the global threshold is then
    chosen over the rest so that the total stays exact. Ties are broken by layer order, then by
    position in the layer.
    """
    names = list(scores)
    total = sum(masks[n].numel() for n in names)
    k = keep_count(density, total)
    check_reachable([masks[n].numel() for n in names], density, max_layer_sparsity)
    floors = {n: layer_floor(masks[n].numel(), max_layer_sparsity) for n in names}
    pieces = []
    for n in names:
        s = scores[n].flatten().float()
        m = masks[n].flatten().to(s.device)
        s = torch.where(m, s, torch.full_like(s, -math.inf))
        floor = min(floors[n], int(m.sum()))
        forced = _stable_top(s, floor)
        pieces.append(torch.where(forced, torch.full_like(s, math.inf), s))
    device = pieces[0].device
    flat = torch.cat([p.to(device) for p in pieces])
    kept_before = sum(int(masks[n].sum()) for n in names)
    if k > kept_before:
        raise SparsityError(f"density {density:g} keeps more weights than are left "
                            f"({kept_before}/{total}); densities must decrease")
    keep = _stable_top(flat, k)
    out, offset = {}, 0
    for n in names:
        numel = masks[n].numel()
        out[n] = keep[offset:offset + numel].reshape(masks[n].shape).to(masks[n].device)
        offset += numel
    return out


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in, *k) -> (out * prod(k) * in / m, m): groups of m consecutive input weights."""
    return t.movedim(1, -1).reshape(-1, m)


def _ungroup(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return g.reshape(moved).movedim(-1, 1)


def nm_compatible(weight_shape: torch.Size, m: int) -> bool:
    return len(weight_shape) >= 2 and weight_shape[1] % m == 0


def nm_masks(scores: Dict[str, torch.Tensor], masks: Masks, n: int, m: int) -> Masks:
    """In every group of m consecutive weights along the input dimension, keep the n best-scored
    (of those still kept; ties go to the earlier position). Layers whose input dimension is not
    a multiple of m are returned unchanged."""
    out = {}
    for name, s in scores.items():
        mask = masks[name]
        if not nm_compatible(mask.shape, m):
            out[name] = mask
            continue
        g = _groups(s.float(), m)
        gm = _groups(mask.to(s.device), m)
        g = torch.where(gm, g, torch.full_like(g, -math.inf))
        order = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :n]
        keep = torch.zeros_like(gm).scatter_(1, order, True) & gm
        out[name] = _ungroup(keep, mask.shape).to(mask.device)
    return out


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive input weights keeps exactly n."""
    return bool((_groups(mask.bool(), m).sum(1) == n).all())


# ----------------------------------------------------------------------------- schedules

def density_schedule(target: float, steps: int) -> List[float]:
    """Exponential schedule from 1 to `target`: target ** (s / steps), s = 1 .. steps."""
    steps = max(1, int(steps))
    return [target ** (s / steps) for s in range(1, steps + 1)]


def nm_schedule(n: int, m: int, steps: int) -> List[int]:
    """Weights kept per group at each step, from m down to n along the exponential schedule."""
    kept = [max(n, min(m, round(m * d))) for d in density_schedule(n / m, steps)]
    kept[-1] = n
    out = [m]
    for k in kept:  # strictly decreasing: a step that removes nothing is dropped
        if k < out[-1]:
            out.append(k)
    return out[1:]


# ----------------------------------------------------------------------------- masks on the model

@torch.no_grad()
def zero_pruned(targets: Targets, masks: Masks) -> None:
    """Write the masks into the weights (removed weights become exactly zero)."""
    for name, t in targets.items():
        w = getattr(t.module, t.attr + "_orig", None)
        w = t.tensor if w is None else w
        w.mul_(masks[name].to(device=w.device, dtype=w.dtype))


def apply_masks(targets: Targets, masks: Masks) -> None:
    """Attach torch.nn.utils.prune parametrisation: weight = weight_orig * weight_mask on every
    forward, so optimiser steps cannot revive a removed weight."""
    remove_masks(targets)
    for name, t in targets.items():
        prune.custom_from_mask(t.module, t.attr, masks[name].to(t.tensor.device))
        if t.owner is not None:
            # nn.MultiheadAttention reads out_proj.weight without calling out_proj: recompute the
            # masked weight before the owner's forward instead.
            hook = next(h for h in t.module._forward_pre_hooks.values()
                        if isinstance(h, prune.BasePruningMethod) and h._tensor_name == t.attr)
            t.module._sparsity_owner_hook = t.owner.register_forward_pre_hook(
                lambda owner, args, hook=hook, module=t.module: hook(module, args))


def remove_masks(targets: Targets) -> None:
    """Fold the parametrisation: the weight becomes a plain parameter holding the masked values."""
    for t in targets.values():
        if hasattr(t.module, t.attr + "_mask"):
            prune.remove(t.module, t.attr)
        handle = t.module.__dict__.pop("_sparsity_owner_hook", None)
        if handle is not None:
            handle.remove()


def density_report(masks: Masks) -> dict:
    per_layer = {}
    kept = total = 0
    for name in masks:
        k, t = int(masks[name].sum()), masks[name].numel()
        per_layer[name] = {"kept": k, "total": t, "density": k / t}
        kept += k
        total += t
    return {"kept": kept, "total": total, "density": kept / max(total, 1), "layers": per_layer}


# ----------------------------------------------------------------------------- sparse export

_MASK, _VALUES, _SHAPE = "__mask__", "__values__", "__shape__"


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def export_sparse(state_dict: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor], path,
                  meta: Optional[dict] = None) -> int:
    """Write `state_dict` with the masked tensors as packed bitmask + kept values (.npz, stored
    uncompressed: the saving is the format's own). masks: {state-dict key: bool mask of that
    tensor}. Returns the file size in bytes."""
    arrays = {}
    for key, tensor in state_dict.items():
        if key in masks:
            mask = masks[key].detach().cpu().bool().flatten()
            values = tensor.detach().cpu().flatten()[mask]
            arrays[key + _MASK] = np.packbits(mask.numpy())
            arrays[key + _VALUES] = _numpy(values)
            arrays[key + _SHAPE] = np.asarray(tuple(tensor.shape), dtype=np.int64)
        else:
            arrays[key] = _numpy(tensor)
    if meta:
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    _atomic_write(path, lambda f: f.write(data))
    return len(data)


def import_sparse(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], dict]:
    """(dense state_dict, {key: bool mask}, meta) from a file written by export_sparse."""
    state, masks, meta = {}, {}, {}
    with np.load(path) as data:
        keys = list(data.keys())
        for key in keys:
            if key == "__meta__":
                meta = json.loads(bytes(data[key]).decode())
            elif key.endswith(_MASK):
                base = key[:-len(_MASK)]
                shape = tuple(int(s) for s in data[base + _SHAPE])
                numel = int(np.prod(shape)) if shape else 1
                mask = torch.from_numpy(np.unpackbits(data[key], count=numel).astype(bool))
                values = torch.from_numpy(data[base + _VALUES].copy())
                dense = torch.zeros(numel, dtype=values.dtype)
                dense[mask] = values
                state[base] = dense.reshape(shape)
                masks[base] = mask.reshape(shape)
            elif not key.endswith((_VALUES, _SHAPE)):
                state[key] = torch.from_numpy(data[key].copy())
    return state, masks, meta


# ----------------------------------------------------------------------------- sparse kernels

def semi_structured_misfit(weight: torch.Tensor) -> Optional[str]:
    """Why `weight` cannot become a 2:4 SparseSemiStructuredTensor, or None when it can: the
    kernels torch picks (cuSPARSELt, or CUTLASS when forced) take only some dtypes, and both
    dimensions must be multiples of their minimum tile (e.g. 16 × 16 for fp16 on cuSPARSELt)."""
    from torch.sparse import SparseSemiStructuredTensor
    kind = (torch.sparse.SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
            else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
    limits = kind._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if limits is None:
        return f"dtype {weight.dtype} has no 2:4 kernel (use {', '.join(map(str, kind._DTYPE_SHAPE_CONSTRAINTS))})"
    rows, cols = weight.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (f"shape {rows} × {cols} is not a multiple of {limits.sparse_min_rows} × "
                f"{limits.sparse_min_cols}")
    if not bool((_groups(weight != 0, 4).sum(1) <= 2).all()):
        return "weight is not 2:4 sparse"
    return None


def to_semi_structured(model: nn.Module) -> List[str]:
    """Swap the weight of every CUDA nn.Linear holding a 2:4 pattern for a
    torch.sparse.SparseSemiStructuredTensor (GPUs with sparse tensor cores, compute capability
    8.0+). Layers the kernels cannot take (see `semi_structured_misfit`) stay dense, so a model
    is never left half converted by an error. Returns the converted layer names."""
    from torch.sparse import to_sparse_semi_structured
    done = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cuda":
            continue
        w = module.weight.detach()
        if semi_structured_misfit(w) is not None:
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        done.append(name)
    return done

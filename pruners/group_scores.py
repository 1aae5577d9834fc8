"""Fold per-parameter scores into one score per prunable channel of a torch-pruning group.

For every layer the group touches:
  * output side of a conv / linear: the weight's score summed over every axis but axis 0, plus the
    bias entry;
  * input side (when the criterion asks for it): summed over every axis but axis 1; for a grouped
    convolution only over the rows of the input channel's own group;
  * depthwise convolution: its row (input and output channel at once), counted once;
  * nn.MultiheadAttention (its embedding dimension): every in/out projection entry of that dim;
  * a free-standing parameter (class token, position embedding): summed over all other axes;
  * normalisation layers only for criteria that score them (NN Slimming).
Each layer's vector is made non-negative (|sum| for the multivariable reading, in which the channel's
parameters are removed together; sum of |s_i| otherwise), layers whose vector is all zero are left out,
the rest are averaged, and the result is normalised within the group.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tpf

NORMALIZERS = ("max", "mean", "sum", "standardization", "none")

_CONV_LINEAR_OUT = (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels)
_CONV_LINEAR_IN = (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels)
_NORM_OUT = (tpf.prune_batchnorm_out_channels, tpf.prune_layernorm_out_channels,
             tpf.prune_groupnorm_out_channels)


def normalize(scores: torch.Tensor, normalizer: str) -> torch.Tensor:
    if normalizer == "none":
        return scores
    if normalizer == "max":
        return scores / scores.max().clamp_min(1e-30)
    if normalizer == "mean":
        return scores / scores.mean().clamp_min(1e-30)
    if normalizer == "sum":
        return scores / scores.sum().clamp_min(1e-30)
    if normalizer == "standardization":
        return (scores - scores.min()) / (scores.max() - scores.min()).clamp_min(1e-30)
    raise ValueError(f"unknown normalizer '{normalizer}'; choose one of: {', '.join(NORMALIZERS)}")


def _fold(t: torch.Tensor, keep_dim: int, multivariable: bool) -> torch.Tensor:
    """Sum `t` over every axis except `keep_dim` (result indexed by that axis)."""
    t = t.detach()
    if not multivariable:
        t = t.abs()
    t = t.movedim(keep_dim, 0)
    return t.reshape(t.shape[0], -1).sum(1)


def _conv_linear_fold(w: torch.Tensor, layer: nn.Module, out_side: bool,
                      multivariable: bool) -> torch.Tensor:
    """One entry per output (out_side) or input channel of a conv / linear layer.

    A grouped convolution's weight holds, for output channel o of group g = o // (out/groups),
    only the in/groups input channels of that group. So input channel c = g * (in/groups) + j is
    scored by column j of the rows of group g alone (and for a transposed convolution, whose
    weight is (in, out/groups, ...), output channel o = g * (out/groups) + j by column j of the
    rows of group g). A depthwise convolution's row c is its input and its output channel c at
    once; torch-pruning couples the two, so it is scored on the output side only.
    """
    transposed = getattr(layer, "transposed", False)
    groups = getattr(layer, "groups", 1)
    axis = 0 if out_side != transposed else 1  # the weight axis that indexes this side
    if groups == 1 or axis == 0:
        return _fold(w, axis, multivariable)
    # Column side of a grouped weight: split the rows into their groups first.
    t = w.detach() if multivariable else w.detach().abs()
    t = t.reshape(groups, t.shape[0] // groups, t.shape[1], -1)  # (group, row, column, rest)
    return t.sum((1, 3)).reshape(-1)  # channel g * columns + j


class ScoreFolder:
    """Callable as a torch-pruning Importance: group -> 1-D channel scores (None if unscored)."""

    def __init__(self, model: nn.Module, scores: Dict[str, torch.Tensor], *, in_channels: bool = True,
                 norm_layers: bool = False, multivariable: bool = True, normalizer: str = "max",
                 finalize=None):
        if normalizer not in NORMALIZERS:
            normalize(torch.ones(1), normalizer)  # raises the one-line error
        self.scores = scores
        self.in_channels = in_channels
        self.norm_layers = norm_layers
        self.multivariable = multivariable
        self.normalizer = normalizer
        self.finalize = finalize
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.param_names = {id(p): n for n, p in model.named_parameters()}

    def _score(self, module: nn.Module, attr: str) -> Optional[torch.Tensor]:
        prefix = self.module_names.get(id(module))
        if prefix is None:
            return None
        return self.scores.get(f"{prefix}.{attr}" if prefix else attr)

    def _layer_term(self, dep, idxs) -> Optional[torch.Tensor]:
        mv = self.multivariable
        layer, fn = dep.target.module, dep.handler
        if isinstance(layer, nn.Parameter):
            name = self.param_names.get(id(layer))
            s = self.scores.get(name) if name else None
            if s is None:
                return None
            # the axis torch-pruning removes entries along (class token / position embedding: 2)
            return _fold(s, dep.target.pruning_dim, mv)[idxs]
        if fn in _CONV_LINEAR_OUT or fn == tpf.prune_depthwise_conv_out_channels:
            w = self._score(layer, "weight")
            if w is None:
                return None
            term = _conv_linear_fold(w, layer, out_side=True, multivariable=mv)
            b = self._score(layer, "bias")
            if b is not None:
                term = term + (b.detach() if mv else b.detach().abs())
            return term[idxs]
        if fn in _CONV_LINEAR_IN:
            if not self.in_channels:
                return None
            w = self._score(layer, "weight")
            if w is None:
                return None
            return _conv_linear_fold(w, layer, out_side=False, multivariable=mv)[idxs]
        if isinstance(layer, nn.MultiheadAttention):
            return self._attention_term(layer, idxs)
        if fn in _NORM_OUT:
            if not self.norm_layers:
                return None
            w = self._score(layer, "weight")
            return None if w is None else (w.detach() if mv else w.detach().abs())[idxs]
        return None

    def _attention_term(self, layer: nn.MultiheadAttention, idxs) -> Optional[torch.Tensor]:
        # Removing embedding dim d of nn.MultiheadAttention removes column d of the packed q/k/v
        # projection, rows d, E+d, 2E+d of it, and row/column d of the output projection.
        mv = self.multivariable
        e = layer.embed_dim
        total = None
        w_in = self._score(layer, "in_proj_weight")
        if w_in is not None:
            total = _fold(w_in, 1, mv) + _fold(w_in.reshape(3, e, -1), 1, mv)
        b_in = self._score(layer, "in_proj_bias")
        if b_in is not None:
            b_in = b_in.detach() if mv else b_in.detach().abs()
            total = (0 if total is None else total) + b_in.reshape(3, e).sum(0)
        for attr, dims in (("out_proj.weight", (0, 1)), ("out_proj.bias", (0,))):
            s = self._score(layer, attr)
            if s is not None:
                for d in dims:
                    total = (0 if total is None else total) + _fold(s, d, mv)
        return None if total is None else total[idxs]

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        n = len(group[0].root_idxs)
        device = None
        acc = None
        layers = 0
        for i, (dep, idxs) in enumerate(group):
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            term = self._layer_term(dep, idxs)
            if term is None:
                continue
            term = term.float().abs()
            if not torch.any(term > 0):
                continue
            if acc is None:
                device = term.device
                acc = torch.zeros(n, device=device, dtype=term.dtype)  # not the default dtype
            acc.scatter_add_(0, torch.as_tensor(root_idxs, device=device), term)
            layers += 1
        if acc is None:
            return None
        acc = acc / layers
        if self.finalize is not None:
            acc = self.finalize(acc)
        return normalize(acc, self.normalizer)

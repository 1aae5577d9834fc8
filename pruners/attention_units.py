"""The prunable units inside every SplitAttention, scored and priced like torch-pruning channels.

torch-pruning sees only the hidden (embedding) side of an attention module: the input columns of
q/k/v and the output rows of out_proj. Its tracing treats scaled_dot_product_attention as an
element-wise op and the per-head reshapes as flat, so it would couple q, k, v and out_proj's input
with indices that ignore the head split. The internal dims are therefore kept out of its groups
(the q/k/v projections are ignored roots) and handled here:

* "qk":   q/k dim j of head h — q row h*qk_dim+j and k row h*qk_dim+j (they meet in Q·Kᵀ);
* "v":    v dim j of head h — v row h*v_dim+j and out_proj column h*v_dim+j (they meet in A·V);
* "head": all q, k, v rows and out_proj columns of head h (used instead of the two above when
          heads are pruned whole).

Every head of a module must keep the same width (the tensors stay rectangular), so a qk / v
*unit* is one dim from every head: unit r removes, in each head, that head's r-th lowest-scored
dim. Units of one slot are removed in order r = 0, 1, ..., and their scores never decrease with r,
so a global ascending sort always reaches them in that order.

Scores fold the per-parameter score dict as ScoreFolder does: per layer the sum over the removed
entries (|sum| when multivariable, sum of |s_i| otherwise), layers with an all-zero vector left
out, mean over the rest, the criterion's `finalize`, then the driver's normalizer within the slot
(the qk dims of a module, its v dims, or its heads). A head's score is the mean over its dims.
Costs are MACs per input, taken from the per-layer MACs of one forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from models.attention import SplitAttention

from .group_scores import ScoreFolder, _fold, normalize
from .limits import min_kept


def attention_projections(model: nn.Module) -> List[nn.Module]:
    """q/k/v projections of every SplitAttention: ignored roots for torch-pruning's groups."""
    return [layer for m in model.modules() if isinstance(m, SplitAttention)
            for layer in (m.q_proj, m.k_proj, m.v_proj)]


@dataclass
class AttentionSlot:
    """One kind of unit of one SplitAttention, in removal order.

    order: qk / v: (heads, width) dim indices per head, lowest score first; head: (heads,).
    unit_scores[r]: score of unit r (non-decreasing); only the first `removable` are offered.
    cost: MACs removed per unit.
    """

    module: SplitAttention
    name: str
    kind: str
    order: torch.Tensor
    unit_scores: torch.Tensor
    removable: int
    cost: float

    def _per_head(self, count: int) -> List[List[int]]:
        return self.order[:, :count].tolist()

    def removed_rows(self, count: int) -> Dict[nn.Module, List[int]]:
        """{projection: output rows} that removing `count` units deletes (for compensation)."""
        m = self.module
        if self.kind == "head":
            qk, v = m.head_rows(self.order[:count].tolist())
            return {m.q_proj: qk, m.k_proj: qk, m.v_proj: v}
        width = m.qk_dim if self.kind == "qk" else m.v_dim
        rows = sorted(h * width + j for h, dims in enumerate(self._per_head(count)) for j in dims)
        return {m.q_proj: rows, m.k_proj: rows} if self.kind == "qk" else {m.v_proj: rows}

    def remove(self, count: int) -> int:
        """Remove the first `count` units (capped at `removable`); returns how many were removed."""
        count = min(int(count), self.removable)
        if count <= 0:
            return 0
        if self.kind == "head":
            self.module.remove_heads(self.order[:count].tolist())
        elif self.kind == "qk":
            self.module.remove_qk_dims(self._per_head(count))
        else:
            self.module.remove_v_dims(self._per_head(count))
        return count


class _RowScorer:
    """Per-row (internal dim) scores of one module's projections, folded like ScoreFolder."""

    def __init__(self, folder: ScoreFolder, prefix: str):
        self.folder = folder
        self.prefix = prefix

    def _get(self, attr: str) -> Optional[torch.Tensor]:
        return self.folder.scores.get(f"{self.prefix}.{attr}" if self.prefix else attr)

    def rows(self, layer: str) -> Optional[torch.Tensor]:
        """Output side of `layer` (weight row + bias entry)."""
        mv = self.folder.multivariable
        w = self._get(f"{layer}.weight")
        if w is None:
            return None
        term = _fold(w, 0, mv)
        b = self._get(f"{layer}.bias")
        if b is not None:
            term = term + (b.detach() if mv else b.detach().abs())
        return term

    def columns(self, layer: str) -> Optional[torch.Tensor]:
        """Input side of `layer` (weight column); only for criteria that read input slices."""
        if not self.folder.in_channels:
            return None
        w = self._get(f"{layer}.weight")
        return None if w is None else _fold(w, 1, self.folder.multivariable)

    def mean(self, *terms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Mean of |term| over the layers that carry a non-zero score, then `finalize`."""
        used = [t.float().abs() for t in terms if t is not None]
        used = [t for t in used if torch.any(t > 0)]
        if not used:
            return None
        acc = torch.stack(used).mean(0)
        return self.folder.finalize(acc) if self.folder.finalize is not None else acc


def _unit_costs(m: SplitAttention, layer_macs: Dict[nn.Module, float]) -> Optional[Dict[str, float]]:
    """MACs removed by one q/k dim, one v dim (each in ONE head) and one head."""
    if any(layer not in layer_macs for layer in (m.q_proj, m.k_proj, m.v_proj, m.out_proj)):
        return None  # never called in the forward pass
    q, k, v, o = (layer_macs[layer] for layer in (m.q_proj, m.k_proj, m.v_proj, m.out_proj))
    length = q / (m.q_proj.out_features * m.q_proj.in_features)  # query tokens
    source = k / (m.k_proj.out_features * m.k_proj.in_features)  # key tokens
    products = length * source  # one dim's share of Q·Kᵀ or of A·V
    qk = q / m.q_proj.out_features + k / m.k_proj.out_features + products
    vd = v / m.v_proj.out_features + o / m.out_proj.in_features + products
    return {"qk": qk, "v": vd, "head": m.qk_dim * qk + m.v_dim * vd}


def _dims_slot(m, name, kind, per_row, cap, cost, normalizer) -> Optional[AttentionSlot]:
    width = m.qk_dim if kind == "qk" else m.v_dim
    original = m.original_qk_dim if kind == "qk" else m.original_v_dim
    removable = width - min_kept(original, cap)
    if per_row is None or removable <= 0:
        return None
    per_dim = normalize(per_row, normalizer).reshape(m.num_heads, width)
    ranked, order = torch.sort(per_dim, dim=1, stable=True)
    unit_scores = ranked.mean(0)[:removable]  # unit r: the r-th lowest dim of every head
    return AttentionSlot(m, name, kind, order, unit_scores, removable, cost * m.num_heads)


def attention_slots(model: nn.Module, folder: ScoreFolder, layer_macs: Dict[nn.Module, float],
                    cap: float, prune_heads: bool = False) -> List[AttentionSlot]:
    """Every prunable slot of every SplitAttention in `model`, scored from `folder.scores`.

    layer_macs: MACs of each nn.Linear for one input (as the driver measures them).
    cap: max_pruning_ratio; a module keeps at least ceil((1 - cap) * original) dims / heads.
    prune_heads: offer whole heads instead of single q/k and v dims.
    """
    slots = []
    for name, m in model.named_modules():
        if not isinstance(m, SplitAttention):
            continue
        costs = _unit_costs(m, layer_macs)
        if costs is None:
            continue
        scorer = _RowScorer(folder, name)
        qk = scorer.mean(scorer.rows("q_proj"), scorer.rows("k_proj"))
        v = scorer.mean(scorer.rows("v_proj"), scorer.columns("out_proj"))
        if prune_heads:
            removable = m.num_heads - min_kept(m.original_num_heads, cap)
            per_head = [t.reshape(m.num_heads, -1) for t in (qk, v) if t is not None]
            if removable <= 0 or not per_head:
                continue
            head = normalize(torch.cat(per_head, dim=1).mean(1), folder.normalizer)
            ranked, order = torch.sort(head, stable=True)
            slots.append(AttentionSlot(m, name, "head", order, ranked[:removable], removable,
                                       costs["head"]))
            continue
        for kind, per_row in (("qk", qk), ("v", v)):
            slot = _dims_slot(m, name, kind, per_row, cap, costs[kind], folder.normalizer)
            if slot is not None:
                slots.append(slot)
    return slots

"""Multi-head attention with separate projections, so attention dims and whole heads can be pruned.

nn.MultiheadAttention ties its internal q/k/v width to the embedding width (head_dim is always
embed_dim / num_heads, and the q/k/v projections are packed in one matrix). `SplitAttention`
computes the same function with four ordinary nn.Linear layers and its own per-head widths:

    q_proj: embed -> num_heads * qk_dim      k_proj: kdim -> num_heads * qk_dim
    v_proj: vdim  -> num_heads * v_dim       out_proj: num_heads * v_dim -> embed

Head h owns rows h*qk_dim ... (h+1)*qk_dim - 1 of q_proj and k_proj, rows h*v_dim ... of v_proj
and the same columns of out_proj. The softmax scale is fixed at construction to
1/sqrt(original head dim) and stored, so removing q/k dims leaves the temperature of the kept
ones unchanged: a pruned module computes exactly what the unpruned one computes with the removed
rows / columns set to zero.

`convert_attention(model)` swaps every nn.MultiheadAttention of a model for an equivalent
SplitAttention with copied weights.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ModelError

__all__ = ["SplitAttention", "convert_attention", "from_multihead", "refresh_width_attributes"]


def _keep_rows(layer: nn.Linear, keep: torch.Tensor) -> None:
    """Keep only output rows `keep` of a linear layer (weight rows and bias entries)."""
    layer.weight = nn.Parameter(layer.weight.data[keep].clone(),
                                requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[keep].clone(), requires_grad=layer.bias.requires_grad)
    layer.out_features = int(keep.numel())


def _keep_columns(layer: nn.Linear, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.data[:, keep].clone(),
                                requires_grad=layer.weight.requires_grad)
    layer.in_features = int(keep.numel())


class SplitAttention(nn.Module):
    """Drop-in replacement for nn.MultiheadAttention with prunable heads and per-head widths.

    forward(query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None,
            average_attn_weights=True, is_causal=False) -> (output, weights or None)
    """

    def __init__(self, embed_dim: int, num_heads: int, qk_dim: Optional[int] = None,
                 v_dim: Optional[int] = None, *, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = True, scale: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        if num_heads < 1 or embed_dim < 1:
            raise ModelError(f"SplitAttention needs embed_dim >= 1 and num_heads >= 1, "
                             f"got {embed_dim} and {num_heads}")
        head_dim = embed_dim // num_heads
        self.num_heads = num_heads
        self.qk_dim = qk_dim or head_dim
        self.v_dim = v_dim or head_dim
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.qk_dim)
        self.dropout = dropout
        self.batch_first = batch_first
        # Sizes before any pruning: the per-module caps are relative to these.
        self.original_num_heads = self.num_heads
        self.original_qk_dim = self.qk_dim
        self.original_v_dim = self.v_dim
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * self.qk_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, num_heads * self.qk_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, num_heads * self.v_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(num_heads * self.v_dim, embed_dim, bias=bias, **kw)

    @property
    def embed_dim(self) -> int:
        return self.out_proj.out_features

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
                f"scale={self.scale:.6g}, batch_first={self.batch_first}")

    # ------------------------------------------------------------------ forward
    def _heads(self, x: torch.Tensor, width: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, width).transpose(1, 2)

    def _mask(self, attn_mask, key_padding_mask, batch: int, length: int, source: int,
              dtype) -> Optional[torch.Tensor]:
        """One additive float mask broadcastable to (batch, heads, length, source), or None."""
        def additive(mask):
            if mask.dtype == torch.bool:  # True = not allowed, as in nn.MultiheadAttention
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                    mask, float("-inf"))
            return mask.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # (batch * heads, L, S)
                mask = mask.reshape(batch, self.num_heads, length, source)
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).reshape(batch, 1, 1, source)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        source = key.shape[1]
        q = self._heads(self.q_proj(query), self.qk_dim)
        k = self._heads(self.k_proj(key), self.qk_dim)
        v = self._heads(self.v_proj(value), self.v_dim)
        mask = self._mask(attn_mask, key_padding_mask, batch, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            logits = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            if is_causal and mask is None:
                causal = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
                logits = logits.masked_fill(~causal, float("-inf"))
            if mask is not None:
                logits = logits + mask
            weights = torch.softmax(logits, dim=-1)
            out = torch.matmul(F.dropout(weights, dropout, self.training), v)
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None,
                                                 scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.v_dim))
        if unbatched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    # ------------------------------------------------------------------ surgery
    def _rows(self, per_head: Sequence[Sequence[int]], width: int) -> torch.Tensor:
        """Rows to KEEP when dims `per_head[h]` are removed from every head h (same count each)."""
        counts = {len(d) for d in per_head}
        if len(per_head) != self.num_heads or len(counts) != 1:
            raise ValueError("remove the same number of dims from every head "
                             f"(got {[len(d) for d in per_head]} for {self.num_heads} heads)")
        if counts.pop() >= width:
            raise ValueError(f"cannot remove all {width} dims of a head; keep at least one")
        removed = [set(int(i) for i in dims) for dims in per_head]
        keep = [h * width + j for h in range(self.num_heads) for j in range(width)
                if j not in removed[h]]
        return torch.as_tensor(keep, dtype=torch.long, device=self.q_proj.weight.device)

    def remove_qk_dims(self, per_head: Sequence[Sequence[int]]) -> None:
        """Remove q/k dims per_head[h] of each head h (q row and k row together)."""
        keep = self._rows(per_head, self.qk_dim)
        _keep_rows(self.q_proj, keep)
        _keep_rows(self.k_proj, keep)
        self.qk_dim -= len(per_head[0])

    def remove_v_dims(self, per_head: Sequence[Sequence[int]]) -> None:
        """Remove v dims per_head[h] of each head h (v row and out_proj column together)."""
        keep = self._rows(per_head, self.v_dim)
        _keep_rows(self.v_proj, keep)
        _keep_columns(self.out_proj, keep)
        self.v_dim -= len(per_head[0])

    def head_rows(self, heads: Sequence[int]) -> Tuple[list, list]:
        """(q/k row indices, v row = out_proj column indices) owned by `heads`."""
        qk = [h * self.qk_dim + j for h in heads for j in range(self.qk_dim)]
        v = [h * self.v_dim + j for h in heads for j in range(self.v_dim)]
        return qk, v

    def remove_heads(self, heads: Sequence[int]) -> None:
        """Remove whole heads: their q, k, v rows and out_proj columns."""
        heads = sorted(set(int(h) for h in heads))
        if not heads:
            return
        if heads[0] < 0 or heads[-1] >= self.num_heads or len(heads) >= self.num_heads:
            raise ValueError(f"cannot remove heads {heads} of {self.num_heads}; keep at least one")
        kept = [h for h in range(self.num_heads) if h not in heads]
        device = self.q_proj.weight.device
        qk, v = self.head_rows(kept)
        qk = torch.as_tensor(qk, dtype=torch.long, device=device)
        v = torch.as_tensor(v, dtype=torch.long, device=device)
        _keep_rows(self.q_proj, qk)
        _keep_rows(self.k_proj, qk)
        _keep_rows(self.v_proj, v)
        _keep_columns(self.out_proj, v)
        self.num_heads = len(kept)


# ---------------------------------------------------------------------- conversion

class AttentionConversionError(ModelError):
    pass


def from_multihead(mha: nn.MultiheadAttention) -> SplitAttention:
    """A SplitAttention computing exactly what `mha` computes, with copied weights."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise AttentionConversionError(
            "nn.MultiheadAttention with add_bias_kv / add_zero_attn cannot be converted for "
            "attention pruning; build it without them")
    weight = mha.out_proj.weight
    has_bias = mha.in_proj_bias is not None
    new = SplitAttention(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=has_bias,
                         dropout=mha.dropout, batch_first=mha.batch_first,
                         device=weight.device, dtype=weight.dtype)
    e = mha.embed_dim
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            q_w, k_w, v_w = mha.in_proj_weight.split(e, dim=0)
        else:
            q_w, k_w, v_w = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        for layer, w in ((new.q_proj, q_w), (new.k_proj, k_w), (new.v_proj, v_w)):
            layer.weight.copy_(w)
        if has_bias:
            for layer, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.split(e)):
                layer.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if new.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
    new.train(mha.training)
    return new


def convert_attention(model: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention in `model` (in place) by an equivalent SplitAttention.

    Returns `model` (or the converted module when `model` itself is an nn.MultiheadAttention).
    Models without nn.MultiheadAttention are returned untouched.
    """
    if isinstance(model, nn.MultiheadAttention):
        return from_multihead(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, from_multihead(mha))
    return model


def refresh_width_attributes(model: nn.Module) -> nn.Module:
    """Update the plain-int width attributes that some modules keep and read in forward, after
    structural pruning changed the tensors underneath (torchvision's VisionTransformer reshapes
    its patch embedding with `self.hidden_dim`; its encoder blocks record `num_heads`)."""
    for module in model.modules():
        token = getattr(module, "class_token", None)
        if isinstance(token, torch.Tensor) and isinstance(getattr(module, "hidden_dim", None), int):
            module.hidden_dim = token.shape[-1]
        attention = getattr(module, "self_attention", None)
        if isinstance(attention, SplitAttention) and isinstance(getattr(module, "num_heads", None), int):
            module.num_heads = attention.num_heads
    return model

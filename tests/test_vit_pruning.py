"""Structured pruning of Vision Transformers: SplitAttention is an exact stand-in for
nn.MultiheadAttention, pruning its internal dims / heads equals zeroing them, unit costs are the
real MACs, and the driver prunes hidden, MLP and attention dims of a tiny ViT to a FLOPs target."""
import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

from models import get_model
from models.attention import SplitAttention, convert_attention, from_multihead
from pruners.attention_units import attention_slots
from pruners.driver import (PruneSettings, StructuredPruner, TargetUnreachable, _layer_macs,
                            prune_to_target)
from pruners.group_scores import ScoreFolder
from pruners.registry import parameter_scores
from utils.flops import count_macs

HIDDEN, MLP, HEADS, HEAD_DIM, CLASSES = 32, 64, 4, 8, 10


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                 num_heads=HEADS, hidden_dim=HIDDEN, mlp_dim=MLP,
                                                 num_classes=CLASSES)
    # torchvision starts the head at zero, which would make every gradient (and output) trivial.
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def _batches(n, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
            for _ in range(n)]


def _prune(model, method, target, steps=4, **kw):
    settings = PruneSettings(target_ops_ratio=target, iterative_steps=steps, iters_per_step=1, **kw)
    return prune_to_target(model, method, _batches, nn.CrossEntropyLoss(), torch.randn(2, 3, 32, 32),
                           settings, [model.heads.head], progress=False)


def _attentions(model):
    return [m for m in model.modules() if isinstance(m, SplitAttention)]


class SelfAttention(nn.Module):
    """x -> attention(x, x, x): lets count_macs / _layer_macs run one SplitAttention."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def _attention_macs_by_hand(m: SplitAttention, length: int) -> int:
    e, h, dq, dv = m.embed_dim, m.num_heads, m.qk_dim, m.v_dim
    projections = 2 * length * e * h * dq + length * e * h * dv + length * h * dv * e
    products = h * length * length * (dq + dv)  # Q·Kᵀ and A·V
    return projections + products


# ----------------------------------------------------------------------------- conversion

def test_conversion_exact_tiny_vit_and_picklable():
    model = tiny_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)  # nn.MultiheadAttention's fused fast path
    with torch.enable_grad():
        before_slow = model(x).detach()
    convert_attention(model)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert len(_attentions(model)) == 2
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before_slow, atol=1e-5, rtol=1e-5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), after)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), after)


def test_conversion_exact_vit_b_16():
    torch.manual_seed(0)
    model = get_model("vit_b_16", 10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.05)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        convert_attention(model)
        after = model(x)
    assert len(_attentions(model)) == 12
    assert all(m.num_heads == 12 and m.qk_dim == m.v_dim == 64 for m in _attentions(model))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_split_attention_matches_mha_with_masks_and_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=True).double().eval()
    split = from_multihead(mha)
    q, k = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), diagonal=3)
    for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal},
                   {"attn_mask": causal, "key_padding_mask": pad}):
        for need_weights in (False, True):
            out, w = split(q, k, k, need_weights=need_weights, **kwargs)
            ref, ref_w = mha(q, k, k, need_weights=need_weights, **kwargs)
            torch.testing.assert_close(out, ref)
            if need_weights:
                torch.testing.assert_close(w, ref_w)
            else:
                assert w is None


def test_oba_scores_unchanged_by_conversion():
    """OBA sees the same bilinear nodes (projections, Q·Kᵀ, A·V) before and after conversion."""
    model = tiny_vit().double()
    batches = [(x.double(), y) for x, y in _batches(1, batch=4)]
    before = parameter_scores("OBA", model, batches)
    convert_attention(model)
    after = parameter_scores("OBA", model, batches)
    prefix = "encoder.layers.encoder_layer_1.self_attention."
    packed = torch.cat([after[prefix + f"{p}_proj.weight"] for p in "qkv"])
    torch.testing.assert_close(packed, before[prefix + "in_proj_weight"], rtol=1e-9, atol=1e-12)
    for name in (prefix + "out_proj.weight", "conv_proj.weight", "class_token"):
        torch.testing.assert_close(after[name], before[name], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- surgery

def _zeroed(m: SplitAttention, qk_rows=(), v_rows=()):
    z = copy.deepcopy(m)
    with torch.no_grad():
        for layer in (z.q_proj, z.k_proj):
            layer.weight[list(qk_rows)] = 0
            layer.bias[list(qk_rows)] = 0
        z.v_proj.weight[list(v_rows)] = 0
        z.v_proj.bias[list(v_rows)] = 0
        z.out_proj.weight[:, list(v_rows)] = 0
    return z


def _split_attention(seed=0):
    torch.manual_seed(seed)
    return SplitAttention(12, 3).double().eval()  # 3 heads of 4 dims


def test_pruned_module_equals_unpruned_with_rows_zeroed():
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    # q/k dims: one per head, different in each head (the stored scale keeps the temperature)
    m = _split_attention()
    zero = _zeroed(m, qk_rows=[1, 4 + 0, 8 + 3])
    m.remove_qk_dims([[1], [0], [3]])
    assert (m.qk_dim, m.q_proj.out_features, m.k_proj.out_features) == (3, 9, 9)
    torch.testing.assert_close(m(x, x, x)[0], zero(x, x, x)[0], rtol=1e-12, atol=1e-12)
    # v dims: v rows with out_proj columns
    m = _split_attention()
    zero = _zeroed(m, v_rows=[0, 2, 4 + 1, 4 + 3, 8 + 0, 8 + 1])
    m.remove_v_dims([[0, 2], [1, 3], [0, 1]])
    assert (m.v_dim, m.v_proj.out_features, m.out_proj.in_features) == (2, 6, 6)
    torch.testing.assert_close(m(x, x, x)[0], zero(x, x, x)[0], rtol=1e-12, atol=1e-12)
    # a whole head
    m = _split_attention()
    zero = _zeroed(m, qk_rows=range(4, 8), v_rows=range(4, 8))
    m.remove_heads([1])
    assert (m.num_heads, m.qk_dim, m.v_dim, m.q_proj.out_features) == (2, 4, 4, 8)
    torch.testing.assert_close(m(x, x, x)[0], zero(x, x, x)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        m.remove_qk_dims([[0], [0, 1]])  # heads must stay rectangular


def test_lowest_units_are_chosen_and_removed_exactly():
    m = _split_attention()
    net = SelfAttention(m)
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in net.named_parameters()}
    x = torch.randn(1, 6, 12, dtype=torch.float64)
    layer_macs = _layer_macs(net, x)
    slots = {s.kind: s for s in attention_slots(net, ScoreFolder(net, scores), layer_macs, cap=0.95)}
    assert set(slots) == {"qk", "v"}

    def rows(layer):
        return (scores[f"attention.{layer}.weight"].sum(1) + scores[f"attention.{layer}.bias"]).abs()

    qk = (rows("q_proj") + rows("k_proj")) / 2
    qk = (qk / qk.max()).reshape(3, 4)
    v = (rows("v_proj") + scores["attention.out_proj.weight"].sum(0).abs()) / 2
    v = (v / v.max()).reshape(3, 4)
    assert slots["qk"].order[:, 0].tolist() == qk.argmin(1).tolist()
    assert slots["v"].order[:, 0].tolist() == v.argmin(1).tolist()
    torch.testing.assert_close(slots["qk"].unit_scores[0], qk.min(1).values.mean().float())
    assert torch.all(slots["qk"].unit_scores[1:] >= slots["qk"].unit_scores[:-1])
    assert slots["qk"].removable == 3  # keeps ceil(4 * 0.05) = 1 per head

    lowest_qk = [h * 4 + int(j) for h, j in enumerate(qk.argmin(1))]
    lowest_v = [h * 4 + int(j) for h, j in enumerate(v.argmin(1))]
    zero = _zeroed(m, qk_rows=lowest_qk, v_rows=lowest_v)
    assert slots["qk"].removed_rows(1)[m.q_proj] == lowest_qk
    slots["qk"].remove(1)
    slots["v"].remove(1)
    assert (m.qk_dim, m.v_dim) == (3, 3)
    torch.testing.assert_close(m(x, x, x)[0], zero(x, x, x)[0], rtol=1e-12, atol=1e-12)


def test_unit_costs_are_the_real_macs():
    length = 6
    x = torch.randn(1, length, 12, dtype=torch.float64)
    for prune_heads, kinds in ((False, ("qk", "v")), (True, ("head",))):
        for kind in kinds:
            net = SelfAttention(_split_attention())
            assert count_macs(net, x) == _attention_macs_by_hand(net.attention, length)
            scores = {n: torch.rand(p.shape, dtype=p.dtype) + 0.1 for n, p in net.named_parameters()}
            slot = {s.kind: s for s in attention_slots(net, ScoreFolder(net, scores), _layer_macs(net, x),
                                                       cap=0.95, prune_heads=prune_heads)}[kind]
            before = count_macs(net, x)
            slot.remove(1)
            assert before - count_macs(net, x) == pytest.approx(slot.cost)
            assert count_macs(net, x) == _attention_macs_by_hand(net.attention, length)


# ----------------------------------------------------------------------------- driver

def test_hidden_group_covers_tokens_and_leaves_internal_dims_out():
    model = convert_attention(tiny_vit())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no guessing about unwrapped parameters
        pruner = StructuredPruner(model, torch.randn(1, 3, 32, 32), [model.heads.head])
    hidden = [g for g in pruner.groups() if len(g[0].root_idxs) == HIDDEN]
    assert len(hidden) == 1
    targets = [dep.target.module for dep, _ in hidden[0]]
    assert any(t is model.class_token for t in targets)
    assert any(t is model.encoder.pos_embedding for t in targets)
    internal = {id(layer) for m in _attentions(model) for layer in (m.q_proj, m.k_proj, m.v_proj)}
    for group in pruner.groups():
        for dep, _ in group:
            module = dep.target.module
            if pruner.DG.is_out_channel_pruning_fn(dep.handler):
                assert id(module) not in internal and module is not model.heads.head
    in_sides = [dep.target.module for dep, _ in hidden[0] if pruner.DG.is_in_channel_pruning_fn(dep.handler)]
    assert sum(id(t) in internal for t in in_sides) == 6  # q, k, v inputs of both blocks


def _macs_by_hand(model, tokens=17, patches=16):
    hidden = model.class_token.shape[-1]
    total = patches * hidden * model.conv_proj.weight[0].numel()
    for block in model.encoder.layers:
        total += _attention_macs_by_hand(block.self_attention, tokens)
        total += 2 * tokens * hidden * block.mlp[0].out_features
    return total + hidden * CLASSES


@pytest.mark.parametrize("method", ["Weight", "Taylor"])
def test_prune_vit_to_target(method):
    model = tiny_vit()
    dense = count_macs(model, torch.randn(1, 3, 32, 32))
    assert count_macs(convert_attention(copy.deepcopy(model)), torch.randn(1, 3, 32, 32)) == dense
    assert dense == _macs_by_hand(convert_attention(copy.deepcopy(model)))
    # With at most half of any layer removable, 0.5 is out of reach without shrinking the hidden
    # dim as well as MLP / attention dims, so every kind of unit must be ranked and removed.
    report = _prune(model, method, 0.5, max_pruning_ratio=0.5)
    macs = count_macs(model, torch.randn(1, 3, 32, 32))
    assert report.macs_before == report.reference_macs == dense
    assert report.macs_after == macs <= 0.5 * dense  # the target is reached...
    assert 0 < report.ops_ratio <= 0.5 and report.steps >= 1  # ...by really pruning
    assert report.params_after < report.params_before
    assert macs == _macs_by_hand(model)
    assert model.heads.head.out_features == CLASSES
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, CLASSES)
    attentions = _attentions(model)
    assert len(attentions) == 2 and not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    for m in attentions:  # rectangular heads
        assert m.q_proj.out_features == m.k_proj.out_features == m.num_heads * m.qk_dim
        assert m.v_proj.out_features == m.out_proj.in_features == m.num_heads * m.v_dim
        assert m.embed_dim == model.class_token.shape[-1] == model.hidden_dim
    assert model.class_token.shape[-1] < HIDDEN
    assert model.encoder.pos_embedding.shape[-1] == model.class_token.shape[-1]
    assert any(block.mlp[0].out_features < MLP for block in model.encoder.layers)
    assert any(m.qk_dim < HEAD_DIM or m.v_dim < HEAD_DIM for m in attentions)


def test_prune_heads_removes_whole_heads():
    model = tiny_vit()
    dense = count_macs(model, torch.randn(1, 3, 32, 32))
    report = _prune(model, "Taylor", 0.3, prune_heads=True)
    macs = count_macs(model, torch.randn(1, 3, 32, 32))
    assert report.macs_after == macs and 0 < macs <= 0.3 * dense
    assert 0 < report.ops_ratio <= 0.3
    attentions = _attentions(model)
    assert any(m.num_heads < HEADS for m in attentions)
    assert all(m.qk_dim == HEAD_DIM and m.v_dim == HEAD_DIM for m in attentions)
    assert all(block.num_heads == block.self_attention.num_heads for block in model.encoder.layers)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, CLASSES)


@pytest.mark.parametrize("prune_heads", [False, True])
def test_caps_respected(prune_heads):
    model = tiny_vit()
    dense = count_macs(model, torch.randn(1, 3, 32, 32))
    # Every layer reaches its cap before 5 % of the MACs: the driver must say so, with the ratio
    # it reached, and leave a working network pruned down to its caps.
    with pytest.raises(TargetUnreachable, match="cannot be reached") as err:
        _prune(model, "Weight", 0.05, steps=3, max_pruning_ratio=0.5, prune_heads=prune_heads)
    reached = count_macs(model, torch.randn(1, 3, 32, 32)) / dense
    assert 0.05 < reached < 1
    assert f"stopped at MACs ratio {reached:.4f}" in str(err.value)
    for m in _attentions(model):
        assert m.num_heads >= 2 and m.qk_dim >= 4 and m.v_dim >= 4
        assert m.embed_dim >= HIDDEN // 2
    assert all(block.mlp[0].out_features >= MLP // 2 for block in model.encoder.layers)
    if not prune_heads:  # dims reach their cap exactly: the cap is the binding limit
        assert all(m.qk_dim == 4 and m.v_dim == 4 for m in _attentions(model))
    with torch.no_grad():
        assert math.isfinite(model(torch.randn(1, 3, 32, 32)).sum().item())

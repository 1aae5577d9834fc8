"""The per-layer cap (`--max_pruning_ratio`): one rule, min_kept, and every pruner keeps the same
minimum on the same width."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torchvision

from models.attention import SplitAttention
from pruners.driver import PruneSettings, TargetUnreachable, prune_to_target
from pruners.eigendamage import EigenBottleneck, collect_eigen_statistics, eigendamage_prune
from pruners.limits import min_kept

CAPS = ["0.1", "0.3", "0.5", "0.7", "0.8", "0.9", "0.95", "0.99"]


def test_min_kept_equals_exact_decimal_arithmetic():
    # The cap as the user typed it, in exact rational arithmetic, against the float helper.
    for text in CAPS:
        cap = Fraction(text)
        for n in range(1, 301):
            assert min_kept(n, float(text)) == max(1, math.ceil((1 - cap) * n)), (n, text)


@pytest.mark.parametrize("original,cap,kept", [
    (20, 0.95, 1),    # (1 - 0.95) * 20 = 1.0000000000000009 in floats: 1, not 2
    (100, 0.95, 5),   # 5.000000000000004
    (10, 0.9, 1),     # 0.9999999999999998: still 1
    (7, 0.7, 3),      # 2.1 rounds up: no layer loses more than the cap
    (5, 0.99, 1),     # 0.05 would keep nothing: at least 1
    (1, 0.5, 1),      # a single channel stays
    (2, 0.5, 1),
    (3, 0.5, 2),
])
def test_min_kept_edge_cases(original, cap, kept):
    assert min_kept(original, cap) == kept


def _tiny_vit(width):
    """Hidden, MLP and (one) head dimension all `width` wide."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1,
                                                 num_heads=1, hidden_dim=width, mlp_dim=width,
                                                 num_classes=3)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def _batches(n, shape=(3, 16, 16), classes=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, *shape, generator=g), torch.randint(0, classes, (4,), generator=g))
            for _ in range(n)]


def test_driver_attention_units_and_eigendamage_keep_the_same_minimum():
    width, cap = 20, 0.95
    floor = min_kept(width, cap)
    assert floor == 1
    # Channel groups (driver) and attention dims (attention_units), pruned to their caps.
    vit = _tiny_vit(width)
    settings = PruneSettings(target_ops_ratio=0.001, iterative_steps=3, iters_per_step=1,
                             max_pruning_ratio=cap)
    with pytest.raises(TargetUnreachable):
        prune_to_target(vit, "Weight", _batches, nn.CrossEntropyLoss(), torch.randn(2, 3, 16, 16),
                        settings, [vit.heads.head], progress=False)
    attention = next(m for m in vit.modules() if isinstance(m, SplitAttention))
    assert (attention.qk_dim, attention.v_dim) == (floor, floor)        # attention_units
    assert vit.encoder.layers[0].mlp[0].out_features == floor           # driver
    assert vit.class_token.shape[-1] == floor                           # driver (hidden group)
    # EigenDamage directions, every one of them asked for.
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                        nn.Linear(width, 3))
    batches = _batches(2, shape=(width,))
    stats = collect_eigen_statistics(mlp, batches, nn.CrossEntropyLoss())
    pruned = eigendamage_prune(mlp, stats, 1.0, max_pruning_ratio=cap, allow_growth=True)
    for i in (0, 2):
        layer = pruned[i]
        assert isinstance(layer, EigenBottleneck)
        assert (layer.core.in_features, layer.core.out_features) == (floor, floor)
    assert pruned[4].core.in_features == floor and pruned[4].core.out_features == 3

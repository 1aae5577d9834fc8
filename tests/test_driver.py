"""The FLOPs-target driver: targets are met, caps respected, the classifier intact, and an
unreachable target fails with a clear error instead of looping."""
import math

import pytest
import torch
import torch.nn as nn

from models import get_classifier, get_model
from pruners.driver import (PruneSettings, PruningError, TargetUnreachable, channel_widths,
                            prune_to_target)
from pruners.group_scores import ScoreFolder
from pruners.registry import parameter_scores
from utils.flops import count_macs


def _batches(n, batch=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _prune(model, method, target, **kw):
    example = torch.randn(2, 3, 32, 32)
    settings = PruneSettings(target_ops_ratio=target, iterative_steps=kw.pop("steps", 4),
                             iters_per_step=1, **kw)
    return prune_to_target(model, method, lambda n: _batches(n), nn.CrossEntropyLoss(), example,
                           settings, [get_classifier(model)], progress=False)


@pytest.mark.parametrize("arch,method", [("resnet20", "Taylor"), ("vgg11", "Weight"),
                                         ("resnet20", "Random")])
def test_target_reached_classifier_intact(arch, method):
    torch.manual_seed(0)
    model = get_model(arch, 10)
    dense = count_macs(model, torch.randn(1, 3, 32, 32))
    report = _prune(model, method, 0.5)
    macs = count_macs(model, torch.randn(1, 3, 32, 32))
    assert report.macs_after == macs
    assert macs <= 0.5 * dense
    assert macs >= 0.3 * dense  # small steps: it does not overshoot wildly
    assert get_classifier(model).out_features == 10
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)


def test_max_pruning_ratio_respected():
    torch.manual_seed(0)
    model = get_model("vgg11", 10)
    before = channel_widths(model)
    _prune(model, "Weight", 0.15, max_pruning_ratio=0.8, steps=6)
    after = channel_widths(model)
    for name, w in after.items():
        assert w["out"] >= math.ceil(before[name]["out"] * 0.2), name


def test_unreachable_target_fails_clearly():
    torch.manual_seed(0)
    model = get_model("vgg11", 10)
    with pytest.raises(TargetUnreachable) as err:
        _prune(model, "Weight", 0.01, max_pruning_ratio=0.5, steps=3)
    msg = str(err.value)
    assert "\n" not in msg and "max_pruning_ratio" in msg and "ratio" in msg


def test_bad_ratio_rejected():
    model = get_model("resnet20", 10)
    with pytest.raises(PruningError):
        _prune(model, "Weight", 0.0)
    with pytest.raises(PruningError):
        _prune(model, "Weight", 1.5)


def test_folded_scores_match_manual_sum():
    """A channel's score is |sum of its output slice (+bias)| plus |sum of the next layer's input
    slice|, averaged over the two layers and divided by the group max."""
    import torch_pruning as tp
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                          nn.Flatten(), nn.Linear(5 * 8 * 8, 3))
    scores = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    folded = ScoreFolder(model, scores, normalizer="none")(group)
    out = (scores["0.weight"].sum((1, 2, 3)) + scores["0.bias"]).abs()
    inp = scores["2.weight"].sum((0, 2, 3)).abs()
    torch.testing.assert_close(folded, (out + inp) / 2)
    # the out-only reading (K-FAC criteria) and normalisation by the maximum
    folded = ScoreFolder(model, scores, in_channels=False)(group)
    torch.testing.assert_close(folded, out / out.max())


def test_parameter_scores_weight_and_taylor_shapes():
    model = get_model("resnet20", 10)
    for method in ("Weight", "Taylor"):
        s = parameter_scores(method, model, _batches(2))
        params = dict(model.named_parameters())
        assert s and all(s[k].shape == params[k].shape for k in s)
        assert "conv1.weight" in s or any(k.endswith("conv1.weight") for k in s)


def test_taylor_is_theta_times_grad_averaged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    batches = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))) for _ in range(3)]
    s = parameter_scores("Taylor", model, batches)
    expect = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            expect[n] += (p * p.grad).abs().detach() / 3
    for n in expect:
        torch.testing.assert_close(s[n], expect[n])

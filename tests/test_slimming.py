"""Network Slimming: |γ| scores and the L1 penalty on BatchNorm scales."""
import torch
import torch.nn as nn

from pruners.registry import get_method, parameter_scores
from pruners.slimming import bn_l1_penalty


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4, 3), nn.BatchNorm1d(3, affine=True), nn.Linear(3, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.5]))
        net[5].weight.copy_(torch.tensor([-0.25, 1.0, 3.0]))
    return net


def test_scores_are_absolute_batchnorm_scales():
    net = _net()
    method = get_method("Slim")
    assert method.norm_layers and not method.in_channels and not method.needs_data
    scores = parameter_scores("Slim", net, [])
    assert set(scores) == {"1.weight", "5.weight"}
    assert torch.equal(scores["1.weight"], torch.tensor([0.5, 2.0, 0.0, 1.5]))
    assert torch.equal(scores["5.weight"], torch.tensor([0.25, 1.0, 3.0]))
    scores["1.weight"].zero_()   # a copy: the model is untouched
    assert net[1].weight[1] == -2.0


def test_l1_penalty_value_and_gradient():
    net = _net()
    penalty = bn_l1_penalty(net)
    assert torch.isclose(penalty, torch.tensor(0.5 + 2.0 + 0.0 + 1.5 + 0.25 + 1.0 + 3.0))
    penalty.backward()
    assert torch.equal(net[1].weight.grad, torch.tensor([1.0, -1.0, 0.0, 1.0]))
    assert torch.equal(net[5].weight.grad, torch.tensor([-1.0, 1.0, 1.0]))
    assert net[0].weight.grad is None


def test_l1_penalty_without_batchnorm_is_zero():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False))
    assert bn_l1_penalty(net).item() == 0.0
    assert parameter_scores("Slim", net, []) == {}

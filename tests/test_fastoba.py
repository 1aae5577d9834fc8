"""fastOBA against brute force (float64): order 1 = θ ⊙ g, order 2 = θ ⊙ Hθ, order 3 = the
third-derivative contraction, over all trainable parameters; options and side effects."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruners.fastoba import fastoba_batch_scores, nested_scores
from pruners.oba import decomposed_attention
from pruners.registry import CriterionError, parameter_scores

DT = torch.float64


class TanhNet(nn.Module):
    """Smooth (nonzero third derivatives), with a LayerNorm whose parameters fastOBA scores."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TanhNet().to(DT)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.3, 0.3)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    names, theta, loss_of = _flat_loss(model, x, y, loss_fn)
    return model, x, y, loss_fn, names, theta, loss_of


def _flat_loss(model, x, y, loss_fn):
    """(parameter names, flat θ, loss as a function of a flat parameter vector)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(vec):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = vec[i:i + math.prod(s)].view(s)
            i += math.prod(s)
        return loss_fn(torch.func.functional_call(model, parts, (x,)), y)
    return names, theta, loss_of


def _flat(scores, names):
    return torch.cat([scores[n].reshape(-1) for n in names])


def test_orders_one_two_three_match_brute_force():
    model, x, y, loss_fn, names, theta, loss_of = _setup()
    # Brute force with plain autograd (explicit Hessian matrix, then its derivative).
    # torch.func is avoided here: its second derivatives through F.layer_norm mix up the
    # weight/input cross terms in this torch release (an asymmetric Hessian; finite
    # differences agree with plain autograd).
    grad = torch.func.grad(loss_of)(theta)
    hess = torch.autograd.functional.hessian(loss_of, theta)
    contracted = torch.autograd.functional.jacobian(   # Σ_jk ∂³L/∂θ_i∂θ_j∂θ_k θ_j θ_k
        lambda t: theta @ torch.autograd.functional.hessian(loss_of, t, create_graph=True)
        @ theta, theta)
    expected = {1: theta * grad,
                2: theta * (hess @ theta),
                3: theta * contracted}
    for order, want in expected.items():
        got = _flat(fastoba_batch_scores(model, x, y, loss_fn, order=order), names)
        assert want.norm() > 1e-4
        assert (got - want).norm() / want.norm() < 1e-10, order
    # the first-order term is added for order > 1 only, fastoba_delta scales the k-th term
    got = _flat(fastoba_batch_scores(model, x, y, loss_fn, order=2, delta=0.5,
                                     fastoba_delta=3.0), names)
    assert torch.allclose(got, 3.0 * expected[2] + 0.5 * expected[1], rtol=1e-10, atol=1e-14)
    got = _flat(fastoba_batch_scores(model, x, y, loss_fn, order=1, delta=0.5,
                                     fastoba_delta=2.0), names)
    assert torch.allclose(got, 2.0 * expected[1], rtol=1e-10, atol=1e-14)


def test_registry_entry_point_side_effects_and_errors():
    torch.manual_seed(0)

    class BNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, inp):
            return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(inp))), 1).flatten(1))

    model = BNNet().train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 5, 5, generator=g), torch.randint(0, 3, (4,), generator=g))
               for _ in range(2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = parameter_scores("fastOBA", model, batches)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    # all trainable parameters, normalisation ones included, with their shapes
    assert {n: s.shape for n, s in scores.items()} == \
        {n: p.shape for n, p in model.named_parameters()}
    per_batch = [fastoba_batch_scores(model, bx, by, nn.CrossEntropyLoss()) for bx, by in batches]
    for n in scores:
        assert torch.allclose(scores[n], (per_batch[0][n] + per_batch[1][n]) / 2,
                              rtol=1e-5, atol=1e-8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(CriterionError, match="order"):
            parameter_scores("fastOBA", model, batches, order=bad)
    with pytest.raises(CriterionError, match="upward_delta"):
        parameter_scores("fastOBA", model, batches, upward_delta=1.0)


def test_order_two_through_multihead_attention():
    """Nested autograd through nn.MultiheadAttention (its fused attention kernel has no double
    backward; fastOBA runs it as explicit matmuls) matches the explicit Hessian."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)
    head = nn.Linear(4, 3).to(DT)
    model = nn.ModuleDict({"attn": attn, "head": head})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, inp):
            return self.m["head"](self.m["attn"](inp, inp, inp, need_weights=False)[0].mean(1))

    net = Net()
    x, y = torch.randn(2, 3, 4, dtype=DT), torch.tensor([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    names, theta, loss_of = _flat_loss(net, x, y, loss_fn)
    with decomposed_attention():  # the brute force needs double backward through attention too
        want = theta * (torch.autograd.functional.hessian(loss_of, theta) @ theta)
    got = _flat(fastoba_batch_scores(net, x, y, loss_fn, order=2), names)
    assert (got - want).norm() / want.norm() < 1e-10


class ShortcutCases(nn.Module):
    """Every case of the order-2 shortcut: convolutions with and without bias, train- or
    eval-mode BatchNorm, one activation feeding two convolutions, a grouped and a transposed
    convolution, a convolution output modified in place, a linear layer applied twice to 3-D
    input (shared weight), a weight also used outside its layer call (its bias still covered),
    a bias also used elsewhere (its weight still covered), a free-standing parameter."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.conv4 = nn.Conv2d(3, 3, 1)
        self.up = nn.ConvTranspose2d(3, 2, 3, padding=1)
        self.shared = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.tensor(0.8))
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv1(x)))
        r = self.conv2(h) + self.conv3(h)
        r = self.conv4(F.relu(r))
        r.mul_(0.5)  # in place on a conv output: conv4 falls back to the generic path
        u = torch.tanh(self.up(r) + 0.3 * self.up.bias.view(1, -1, 1, 1))
        t = u.flatten(2).transpose(1, 2)  # (batch, 16 tokens, 2)
        t = self.shared(torch.tanh(self.shared(t))) * self.scale
        v = t.mean(1)
        return self.head(v) + F.linear(v, 0.5 * self.head.weight)


def _shortcut_covered(model, x):
    """Names of the parameters that the order-2 shortcut covers for this forward."""
    from pruners.fastoba import _LayerCallRecorder, _shortcut_calls
    named = dict(model.named_parameters())
    recorder = _LayerCallRecorder(list(named.values()))
    with recorder:
        model(x)
    _, direct = _shortcut_calls(recorder)
    return {n for n, p in named.items() if id(p) in direct}


@pytest.mark.parametrize("train", [True, False])
def test_order_two_shortcut_equals_brute_force(train):
    torch.manual_seed(0)
    model = ShortcutCases().to(DT)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.3, 0.3)
    model.train(train)
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    y = torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    assert _shortcut_covered(model, x) == {
        "conv1.weight", "conv1.bias", "conv2.weight", "conv3.weight", "conv3.bias",
        "up.weight", "shared.weight", "shared.bias", "head.bias"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = fastoba_batch_scores(model, x, y, loss_fn, order=2, delta=0.25)
    model.load_state_dict(state)  # the train-mode forward moved the running statistics
    names, theta, loss_of = _flat_loss(model, x, y, loss_fn)
    hessian = torch.autograd.functional.hessian(loss_of, theta)
    grad = torch.autograd.functional.jacobian(loss_of, theta)
    want = theta * (hessian @ theta) + 0.25 * grad * theta
    assert (_flat(got, names) - want).norm() / want.norm() < 1e-10
    # the plain double-backward path agrees
    model.load_state_dict(state)
    nested_names, h_theta, _ = nested_scores(model, x, y, loss_fn, 2)
    assert nested_names == names
    assert torch.allclose(theta * torch.cat([t.reshape(-1) for t in h_theta]),
                          want - 0.25 * grad * theta, rtol=1e-10, atol=1e-12)

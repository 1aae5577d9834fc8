"""Kron-OBS through the structured driver (pruners/driver.py), on tiny float64 networks: the
surviving filters of a pruned layer move by exactly the OBS step under F = S ⊗ A (checked against
a brute-force constrained solve with factors from per-example loops), `--no-obs_update` leaves
them untouched, and a group torch-pruning refuses keeps its weights as they were."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruners.driver import PruneSettings, StructuredPruner, prune_to_target
from pruners.registry import get_method

DAMPING = 1e-2


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 maths


def _net(widths=(4,), seed=0):
    """conv(3 -> w1) -> relu -> ... -> conv -> relu -> global pool -> linear(5)."""
    torch.manual_seed(seed)
    layers, cin = [], 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
        cin = w
    layers += [nn.Conv2d(cin, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(3, 5)]
    return nn.Sequential(*layers)


def _batches(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 6, 6, generator=g), torch.randint(0, 5, (6,), generator=g))
            for _ in range(n)]


def _theta(conv):
    return torch.cat([conv.weight.detach().reshape(conv.out_channels, -1),
                      conv.bias.detach().reshape(-1, 1)], 1)


def _brute_force_factors(model, conv, batches):
    """A = E[a aᵀ] over examples and positions (im2col patch with a trailing 1), S = E_n[Σ_t s sᵀ]
    with s the gradient of the per-example loss (empirical Fisher), by loops over examples."""
    A = S = 0
    positions = examples = 0
    for x, y in batches:
        for n in range(x.shape[0]):
            seen = {}
            handle = conv.register_forward_hook(lambda m, i, o: seen.update(a=i[0], z=o))
            loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
            handle.remove()
            s = torch.autograd.grad(loss, seen["z"])[0][0].reshape(conv.out_channels, -1).t()
            a = F.unfold(seen["a"].detach(), 3, padding=1)[0].t()
            a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
            A, S = A + a.t() @ a, S + s.t() @ s
            positions += a.shape[0]
            examples += 1
    A, S = A / positions, S / examples

    def damp(m):  # relative to the factor's mean diagonal (the convention of kfac.damped)
        return m + DAMPING * torch.diagonal(m).mean() * torch.eye(m.shape[0])
    return damp(A), damp(S)


def _obs_step(theta, A, S, removed):
    """Minimise ½ δᵀ (S ⊗ A) δ over vec(δ) (row-major) subject to δ = −θ on the rows `removed`:
    δ = −F⁻¹E (EᵀF⁻¹E)⁻¹ Eᵀθ, solved with the full Kronecker matrix."""
    F_inv = torch.linalg.inv(torch.kron(S, A))
    d = theta.shape[1]
    idx = torch.tensor([i * d + j for i in removed for j in range(d)])
    vec = theta.reshape(-1)
    delta = -F_inv[:, idx] @ torch.linalg.solve(F_inv[idx][:, idx], vec[idx])
    return (vec + delta).reshape(theta.shape)


def _options(obs_update):
    return {"fisher_type": "empirical", "damping": DAMPING, "obs_update": obs_update}


@pytest.mark.parametrize("obs_update", [True, False])
def test_driver_step_moves_survivors_by_the_obs_update(obs_update):
    model = _net()
    dense = copy.deepcopy(model)
    batches = _batches()
    # A target just below 1: one step removes exactly one channel, the globally lowest-scored.
    settings = PruneSettings(target_ops_ratio=0.995, iterative_steps=1, iters_per_step=1,
                             normalizer="none", method_options=_options(obs_update))
    report = prune_to_target(model, "Kron-OBS", lambda n: batches, nn.CrossEntropyLoss(),
                             torch.randn(1, 3, 6, 6), settings, [model[-1]], progress=False)
    assert report.steps == 1 and report.macs_after < report.macs_before
    convs = [i for i, m in enumerate(dense) if isinstance(m, nn.Conv2d)]
    shrunk = [i for i in convs if model[i].out_channels < dense[i].out_channels]
    assert len(shrunk) == 1 and model[shrunk[0]].out_channels == dense[shrunk[0]].out_channels - 1
    i = shrunk[0]
    A, S = _brute_force_factors(dense, dense[i], batches)
    theta = _theta(dense[i])
    # The removed filter is the one with the lowest Kron-OBS score ½ θ_pᵀ A θ_p / [S⁻¹]_pp.
    scores = 0.5 * torch.einsum("pi,ij,pj->p", theta, A, theta) / torch.diagonal(torch.linalg.inv(S))
    p = int(scores.argmin())
    keep = [r for r in range(theta.shape[0]) if r != p]
    got = _theta(model[i])
    if obs_update:
        expected = _obs_step(theta, A, S, [p])
        assert torch.all(expected[p].abs() < 1e-12)  # the removed filter becomes exactly zero
        torch.testing.assert_close(got, expected[keep], rtol=1e-8, atol=1e-10)
        assert not torch.allclose(got, theta[keep], atol=1e-6)  # it really moved
        # the single-filter formula of DESIGN.md: −S⁻¹e_p ⊗ θ_p / [S⁻¹]_pp
        S_inv = torch.linalg.inv(S)
        single = theta - torch.outer(S_inv[:, p], theta[p]) / S_inv[p, p]
        torch.testing.assert_close(got, single[keep], rtol=1e-8, atol=1e-10)
    else:
        assert torch.equal(got, theta[keep])
    # The next layer loses the matching input channel and nothing else changes in it.
    following = next(j for j in convs + [len(dense) - 1] if j > i)
    w = dense[following].weight.detach()
    assert torch.equal(model[following].weight, w[:, keep])
    for j in convs:
        if j != i:
            assert torch.equal(model[j].bias, dense[j].bias)


def test_refused_groups_keep_their_weights(monkeypatch):
    """Of three planned groups, torch-pruning's check rejects the first and its surgery fails on
    the second: only the third is removed, and only the third is compensated."""
    model = _net(widths=(4, 4))
    batches = _batches()
    method = get_method("Kron-OBS")
    method.score(model, batches, nn.CrossEntropyLoss(), **_options(True))
    first, second, third = [m for m in model if isinstance(m, nn.Conv2d)]
    before = {m: _theta(m).clone() for m in (first, second, third)}
    pruner = StructuredPruner(model, torch.randn(1, 3, 6, 6), [model[-1]])
    handler = pruner.DG.get_pruner_of_module(first).prune_out_channels
    check, form = pruner.DG.check_pruning_group, pruner.DG.get_pruning_group

    def failing(*_):
        raise RuntimeError("cannot cut this layer")

    def get_pruning_group(module, fn, idxs):
        group = form(module, fn, idxs)
        if module is second:
            group.prune = failing
        return group

    monkeypatch.setattr(pruner.DG, "check_pruning_group",
                        lambda group: group[0].dep.target.module is not first and check(group))
    monkeypatch.setattr(pruner.DG, "get_pruning_group", get_pruning_group)
    plan = [(first, handler, [0]), (second, handler, [1]), (third, handler, [2])]
    removed = pruner.apply(plan, method.compensate, method.state)
    assert removed == 1
    assert (first.out_channels, second.out_channels, third.out_channels) == (4, 4, 2)
    assert torch.equal(_theta(first), before[first])    # rejected by the check: untouched
    assert torch.equal(_theta(second), before[second])  # surgery failed: weights restored
    S_inv = method.state["S_inverse"][next(n for n, m in model.named_modules() if m is third)]
    theta = before[third]
    expected = theta - torch.outer(S_inv[:, 2], theta[2]) / S_inv[2, 2]
    torch.testing.assert_close(_theta(third), expected[[0, 1]], rtol=1e-10, atol=1e-12)
    assert "cannot cut this layer" in " ".join(pruner.left_alone.values())

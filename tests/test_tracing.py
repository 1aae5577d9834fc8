"""The shared tracing module: backward hooks lifted for scoring and put back exactly; the
closed-form input and weight gradients of conv / linear calls against autograd."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch.nn.modules.module as module_impl
from pruners.registry import parameter_scores
from pruners.tracing import input_transpose, lifted_backward_hooks, weight_transpose

DT = torch.float64


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(h + self.conv2(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, 4, (3,), generator=g))
            for _ in range(2)]


@pytest.mark.parametrize("method, options", [("OBA", {"delta": 0.3}), ("fastOBA", {}),
                                             ("fastOBA", {"order": 3})])
def test_models_with_full_backward_hooks_score_as_without(method, options):
    torch.manual_seed(0)
    model = ConvNet().to(DT)
    batches = _batches()
    plain = parameter_scores(method, copy.deepcopy(model), batches, **options)

    fired = []

    def scale_grad(module, grad_input, grad_output):  # would corrupt scores if it ran
        fired.append(type(module).__name__)
        return tuple(None if g is None else 3 * g for g in grad_input)

    handles = [model.conv2.register_full_backward_hook(scale_grad),
               model.fc.register_full_backward_hook(scale_grad),
               model.conv1.register_full_backward_pre_hook(lambda m, g: fired.append("pre")),
               nn.modules.module.register_module_full_backward_hook(
                   lambda m, gi, go: fired.append("global"))]
    try:
        dicts = {m: (m._backward_hooks, dict(m._backward_hooks), m._backward_pre_hooks,
                     dict(m._backward_pre_hooks), m._is_full_backward_hook)
                 for m in model.modules()}
        global_hooks = module_impl._global_backward_hooks
        global_items = dict(global_hooks)

        scores = parameter_scores(method, model, batches, **options)
        assert fired == []  # no hook saw the scoring passes
        assert set(scores) == set(plain)
        for name in plain:
            assert torch.allclose(scores[name], plain[name], rtol=1e-12, atol=1e-15), name

        # exactly the same hook dicts and flags are back
        for m, (hooks, items, pre, pre_items, full) in dicts.items():
            assert m._backward_hooks is hooks and dict(hooks) == items
            assert m._backward_pre_hooks is pre and dict(pre) == pre_items
            assert m._is_full_backward_hook is full
        assert module_impl._global_backward_hooks is global_hooks
        assert dict(global_hooks) == global_items

        # and they still fire
        x, y = batches[0]
        F.cross_entropy(model(x), y).backward()
        assert fired.count("Conv2d") == 1 and fired.count("Linear") == 1
        assert "pre" in fired and "global" in fired
    finally:
        for h in handles:
            h.remove()
    # the handles removed them from the restored dicts
    assert not any(m._backward_hooks or m._backward_pre_hooks for m in model.modules())
    assert not module_impl._global_backward_hooks


def test_hooks_come_back_after_an_error():
    model = ConvNet()
    handle = model.fc.register_full_backward_hook(lambda m, gi, go: None)
    hooks = model.fc._backward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with lifted_backward_hooks(model):
            assert not model.fc._backward_hooks
            raise RuntimeError("boom")
    assert model.fc._backward_hooks is hooks and handle.id in hooks
    handle.remove()


@pytest.mark.parametrize("func, x_shape, w_shape, options", [
    (F.linear, (4, 3, 5), (6, 5), {}),
    (F.conv1d, (2, 4, 9), (6, 2, 3), {"stride": 2, "padding": 1, "groups": 2}),
    (F.conv2d, (2, 4, 7, 6), (6, 4, 3, 3), {"stride": 1, "padding": 2, "dilation": 2}),
    (F.conv2d, (2, 4, 7, 6), (4, 1, 3, 3), {"stride": 2, "padding": 1, "groups": 4}),
    (F.conv3d, (2, 2, 5, 4, 4), (3, 2, 3, 2, 2), {"stride": (1, 2, 1)}),
])
def test_closed_form_gradients_equal_autograd(func, x_shape, w_shape, options):
    """input_transpose: g ↦ ∂⟨g, B(x, W)⟩/∂x; weight_transpose: (u, g) ↦ ∂⟨g, B(u, W)⟩/∂W."""
    torch.manual_seed(0)
    x = torch.randn(*x_shape, dtype=DT, requires_grad=True)
    w = torch.randn(*w_shape, dtype=DT, requires_grad=True)
    args = (x, w, None) + tuple(options.get(k, d) for k, d in
                                (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))) \
        if func is not F.linear else (x, w)
    z = func(*args)
    g = torch.randn_like(z)
    grad_x, grad_w = torch.autograd.grad(z, [x, w], g)
    torch.testing.assert_close(input_transpose(func, args, {}, x, w)(g), grad_x)
    torch.testing.assert_close(weight_transpose(func, args, {}, x, w)(x.detach(), g), grad_w)
    # string padding and mixed dtypes have no closed form here
    if func is not F.linear:
        same = (x, w, None, 1, "same")
        assert weight_transpose(func, same, {}, x, w) is None
    assert weight_transpose(func, args, {}, x.float(), w) is None

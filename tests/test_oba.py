"""OBA against brute force (float64, tiny networks).

* ReLU / max-pool networks (linear, conv, residual add, pooling, flatten, eval-mode BatchNorm):
  H̃δθ from oba_hvp equals (H − GGN)δθ from torch.func.
* A one-block transformer (class token, position embedding, LayerNorm, attention, GELU MLP),
  run through nn.MultiheadAttention (sdpa and need_weights paths), F.scaled_dot_product_attention
  and explicit softmax attention: each of the upstream / downstream / parallel components (as
  the published flags isolate them) equals its brute-force definition, built for every bilinear node Z = B(a, b) from the mixed second
  derivative ∂²/∂θ∂φ ⟨g_Z, B(a(θ), b(φ))⟩ (one operand frozen at a time); and
  H − GGN = Σ_bilinear nodes (M + Mᵀ) + Σ_smooth nodes J_xᵀ ∇²⟨g_y, f(x)⟩ J_x, i.e. OBA leaves
  out exactly the curvature of LayerNorm, softmax and GELU.
* The published meaning of --upward_delta / --downward_delta / --parallel_delta on a tiny
  network with two multiplied branches, against components built from blocks of the full Hessian.
* Side effects, train/eval agreement and the registry entry point.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruners.oba import oba_batch_scores, oba_hvp, perturbed_parameters
from pruners.registry import CriterionError, parameter_scores

DT = torch.float64


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vec, shapes):
    out, i = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(vec[i:i + n].view(s))
        i += n
    return out


def _brute_h_minus_ggn(model, x, y, loss_fn):
    """(names, δθ, (H − GGN)δθ) over OBA's perturbed parameters, by torch.func; the model may
    return one tensor or a tuple of them (the GGN is over all of them together)."""
    perturbed = perturbed_parameters(model)
    names = list(perturbed)
    shapes = [perturbed[n].shape for n in names]
    theta = _flat([perturbed[n].detach() for n in names])

    def outputs(vec):
        return torch.func.functional_call(model, dict(zip(names, _unflat(vec, shapes))), (x,))
    first = outputs(theta)
    single = isinstance(first, torch.Tensor)
    out_shapes = [first.shape] if single else [o.shape for o in first]

    def flat_outputs(vec):
        out = outputs(vec)
        return _flat([out] if single else out)

    def loss_of_flat(flat):
        parts = _unflat(flat, out_shapes)
        return loss_fn(parts[0] if single else tuple(parts), y)

    hess = torch.func.hessian(lambda v: loss_fn(outputs(v), y))(theta)
    jac = torch.func.jacrev(flat_outputs)(theta)
    loss_hess = torch.func.hessian(loss_of_flat)(flat_outputs(theta).detach())
    return names, theta, (hess - jac.T @ loss_hess @ jac) @ theta


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class ResidualConvNet(nn.Module):
    """conv → eval-mode BN → ReLU → max-pool → residual conv block → flatten → linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        h = F.relu(h + self.conv2(h))
        return self.fc(torch.flatten(h, 1))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def _assert_hvp_is_brute_force(model, shape):
    """OBA's H̃δθ on a random float64 batch equals the brute-force (H − GGN)δθ; returns
    (x, y, loss_fn, names, θ, (H − GGN)θ, OBA's loss)."""
    x, y = torch.randn(*shape, dtype=DT), torch.randint(0, 3, (shape[0],))
    loss_fn = nn.CrossEntropyLoss()
    names, theta, expected = _brute_h_minus_ggn(model, x, y, loss_fn)
    loss, hv = oba_hvp(model, x, y, loss_fn)
    got = _flat([hv[n] for n in names])
    assert expected.norm() > 1e-3
    assert (got - expected).norm() / expected.norm() < 1e-10
    return x, y, loss_fn, names, theta, expected, loss


@pytest.mark.parametrize("net, shape", [(ReluMLP, (7, 5)), (ResidualConvNet, (5, 2, 4, 4))])
def test_hvp_equals_hessian_minus_gauss_newton(net, shape):
    torch.manual_seed(0)
    model = net().to(DT)
    _randomise_bn(model)
    model.eval()
    x, y, loss_fn, names, theta, expected, loss = _assert_hvp_is_brute_force(model, shape)
    assert torch.allclose(loss, loss_fn(model(x), y))
    # scores follow: s = θ ⊙ H̃θ (+ delta · g ⊙ θ)
    grads = torch.autograd.grad(loss_fn(model(x), y), [dict(model.named_parameters())[n]
                                                      for n in names])
    scores = oba_batch_scores(model, x, y, loss_fn, delta=0.5)
    expected_scores = theta * expected + 0.5 * _flat(grads) * theta
    assert torch.allclose(_flat([scores[n] for n in names]), expected_scores, rtol=1e-10,
                          atol=1e-13)
    # normalisation parameters are fixed, not scored
    assert not any(n.startswith("bn.") for n in scores)


class ConvVariantsNet(nn.Module):
    """Strided, dilated-grouped, 'same'-padded 2-d convs and a 1-d conv: the input gradient
    rebuilt from ∂L/∂Z (numeric padding) and the alias path ('same') side by side."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.same = nn.Conv2d(4, 3, 3, padding="same", bias=False)
        self.line = nn.Conv1d(3, 2, 2, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.same(F.relu(self.grouped(F.relu(self.strided(x))))))
        h = F.relu(self.line(h.flatten(2)))  # (N, 3, 9) → (N, 2, 4)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("closed_forms", [True, False])
def test_conv_variants_match_brute_force(closed_forms, monkeypatch):
    """H̃δθ against brute force with the closed forms of conv / linear calls (∂L/∂X rebuilt from
    ∂L/∂Z in the sinks, TransposedSlot; weight terms made by the probe on Z during the ordinary
    backward), and without them (every input through the alias path, every weight term through
    its own autograd graph)."""
    import pruners.oba as oba
    rebuilt, probed = [], []
    if closed_forms:
        for name, made in (("TransposedSlot", rebuilt), ("weight_transpose", probed)):
            def counted(*a, original=getattr(oba, name), made=made):
                result = original(*a)
                made.extend([1] if result is not None else [])
                return result
            monkeypatch.setattr(oba, name, counted)
    else:
        monkeypatch.setattr(oba, "input_transpose", lambda *a: None)
        monkeypatch.setattr(oba, "weight_transpose", lambda *a: None)
    torch.manual_seed(4)
    _assert_hvp_is_brute_force(ConvVariantsNet().to(DT), (5, 2, 6, 6))
    # grouped, line and fc are rebuilt and probed; strided sees the data (no gradient, no
    # tangent), same has string padding (alias, autograd graph)
    assert (len(rebuilt), len(probed)) == ((3, 3) if closed_forms else (0, 0))


class InplaceReluNet(nn.Module):
    """conv → ReLU(inplace=True) → linear → ReLU(inplace=True) → linear, as torchvision's VGG and
    AlexNet are built: the in-place ReLU rewrites the very outputs whose gradients OBA reads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(27, 5), nn.Linear(5, 3)
        self.act1, self.act2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fc2(self.act2(self.fc1(self.act1(self.conv(x)).flatten(1))))


def test_inplace_relu_modules_score_as_out_of_place():
    torch.manual_seed(5)
    model = InplaceReluNet().to(DT)
    _assert_hvp_is_brute_force(model, (4, 2, 3, 3))
    assert model.act1.inplace and model.act2.inplace  # put back


def test_inplace_change_of_a_product_is_a_clear_error():
    """A functional in-place op on a product OBA reads (here F.relu_ on a linear output) would
    give wrong gradients silently; it is refused with what to change."""

    class Functional(ReluMLP):
        def forward(self, x):
            return self.fc3(F.relu_(self.fc2(F.relu(self.fc1(x)))))

    model = Functional().to(DT)
    with pytest.raises(CriterionError, match="in place"):
        oba_hvp(model, torch.randn(3, 5, dtype=DT), torch.tensor([0, 1, 2]), nn.CrossEntropyLoss())


# ----------------------------------------------------------------------------- transformer

D, HEADS, IN_DIM, TOKENS, HIDDEN, CLASSES = 4, 2, 3, 3, 5, 3
# canonical parameter names of the brute-force model, in the order of its flat vector
CANON = ["embed.weight", "embed.bias", "cls", "pos", "qkv.weight", "qkv.bias", "proj.weight",
         "proj.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight",
         "head.bias"]
MHA_NAMES = {"qkv.weight": "attn.in_proj_weight", "qkv.bias": "attn.in_proj_bias",
             "proj.weight": "attn.out_proj.weight", "proj.bias": "attn.out_proj.bias"}


class TinyTransformer(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention
        self.embed = nn.Linear(IN_DIM, D)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.5 * torch.randn(1, TOKENS + 1, D))
        self.norm = nn.LayerNorm(D)
        if attention.startswith("mha"):
            self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
        self.head = nn.Linear(D, CLASSES)

    def attend(self, u):
        if self.attention == "mha":
            return self.attn(u, u, u, need_weights=False)[0]
        if self.attention == "mha_weights":  # the bmm / softmax path of the fused functional
            return self.attn(u, u, u, need_weights=True)[0]
        n, t, _ = u.shape
        q, k, v = (z.view(n, t, HEADS, D // HEADS).transpose(1, 2)
                   for z in self.qkv(u).chunk(3, dim=-1))
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(n, t, D))

    def forward(self, x):
        h = self.embed(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.pos
        h = h + self.attend(self.norm(h))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h[:, 0])


def _model_name(attention, canon):
    return MHA_NAMES.get(canon, canon) if attention.startswith("mha") else canon


def staged_forward(p, x, norm, probes=None):
    """The same network written out by hand. Records every bilinear node (name →
    (a, b, B, component of the term into a, component of the term into b)) and every smooth
    node (name → (input, f)); `probes` are added to node outputs to read off g_Z."""
    bilinear, smooth = {}, {}

    def out(name, value):
        return value + probes[name] if probes is not None else value

    def node(name, a, b, fn, into_a, into_b):
        bilinear[name] = (a, b, fn, into_a, into_b)
        return out(name, fn(a, b))

    def nonlinear(name, value, fn):
        smooth[name] = (value, fn)
        return out(name, fn(value))

    def linear(name, a, w, bias):  # activation × weight
        return node(name, a, w, lambda s, t: s @ t.T, "downstream", "upstream") + bias

    n = x.shape[0]
    h = linear("embed", x, p["embed.weight"], p["embed.bias"])
    h = torch.cat([p["cls"].expand(n, -1, -1), h], dim=1) + p["pos"]
    layer_norm = lambda s: F.layer_norm(s, (D,), norm.weight, norm.bias, norm.eps)
    u = nonlinear("norm", h, layer_norm)
    q, k, v = (z.view(n, TOKENS + 1, HEADS, D // HEADS).transpose(1, 2)
               for z in linear("qkv", u, p["qkv.weight"], p["qkv.bias"]).chunk(3, dim=-1))
    scores = node("qk", q, k, lambda s, t: s @ t.transpose(-2, -1), "parallel", "parallel")
    attn = nonlinear("softmax", scores / math.sqrt(D // HEADS), lambda s: torch.softmax(s, -1))
    o = node("av", attn, v, lambda s, t: s @ t, "parallel", "parallel")
    o = o.transpose(1, 2).reshape(n, TOKENS + 1, D)
    h = h + linear("proj", o, p["proj.weight"], p["proj.bias"])
    a = nonlinear("gelu", linear("fc1", h, p["fc1.weight"], p["fc1.bias"]), F.gelu)
    h = h + linear("fc2", a, p["fc2.weight"], p["fc2.bias"])
    return linear("head", h[:, 0], p["head.weight"], p["head.bias"]), bilinear, smooth


@pytest.fixture(scope="module")
def transformer_case():
    """Shared parameters, data and every brute-force quantity."""
    torch.manual_seed(3)
    ref = TinyTransformer("explicit").to(DT)
    with torch.no_grad():
        ref.norm.weight.uniform_(0.5, 1.5)
        ref.norm.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, TOKENS, IN_DIM, dtype=DT)
    y = torch.tensor([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    canon = dict(ref.named_parameters())
    shapes = [canon[n].shape for n in CANON]
    theta = _flat([canon[n].detach() for n in CANON])

    def params(vec):
        return dict(zip(CANON, _unflat(vec, shapes)))

    def run(vec, probes=None):
        return staged_forward(params(vec), x, ref.norm, probes)

    logits0, bilinear0, smooth0 = run(theta)
    assert torch.allclose(logits0, ref(x))
    probes0 = {k: torch.zeros_like(fn(a, b)) for k, (a, b, fn, _, _) in bilinear0.items()}
    probes0.update({k: torch.zeros_like(fn(v)) for k, (v, fn) in smooth0.items()})
    g = torch.func.grad(lambda pr: loss_fn(run(theta, pr)[0], y))(probes0)

    components = {c: torch.zeros_like(theta) for c in ("upstream", "downstream", "parallel")}
    for name, (_, _, fn, into_a, into_b) in bilinear0.items():
        def pairing(t, f, name=name, fn=fn):  # ⟨g_Z, B(a(θ), b(φ))⟩
            return (g[name] * fn(run(t)[1][name][0], run(f)[1][name][1])).sum()
        mixed = torch.func.jacrev(torch.func.grad(pairing, argnums=1), argnums=0)(theta, theta)
        # mixed[j, i] = ∂²/∂φ_j∂θ_i: into a (θ side) the term is mixedᵀ δθ, into b mixed δθ
        components[into_a] += mixed.T @ theta
        components[into_b] += mixed @ theta

    excluded = torch.zeros_like(theta)
    for name, (_, fn) in smooth0.items():
        def node_input(t, name=name):
            return run(t)[2][name][0]
        x0, x_dot = torch.func.jvp(node_input, (theta,), (theta,))
        curvature = torch.autograd.functional.hvp(
            lambda s, fn=fn, name=name: (g[name] * fn(s)).sum(), x0.detach(), x_dot)[1]
        excluded += torch.func.vjp(node_input, theta)[1](curvature)[0]

    logits = lambda t: run(t)[0]
    # plain autograd for the full Hessian (torch.func's second derivatives through
    # F.layer_norm are not trusted here, see tests/test_fastoba.py)
    hess = torch.autograd.functional.hessian(lambda t: loss_fn(logits(t), y), theta)
    jac = torch.func.jacrev(logits)(theta).reshape(-1, theta.numel())
    loss_hess = torch.func.hessian(lambda o: loss_fn(o, y))(logits0.detach()).reshape(
        logits0.numel(), logits0.numel())
    h_minus_ggn = (hess - jac.T @ loss_hess @ jac) @ theta
    return dict(ref=ref, x=x, y=y, loss_fn=loss_fn, components=components,
                excluded=excluded, h_minus_ggn=h_minus_ggn)


def test_brute_force_decomposition_is_complete(transformer_case):
    """H − GGN = bilinear terms (what OBA keeps) + smooth-node curvature (what it leaves out)."""
    c = transformer_case
    kept = sum(c["components"].values())
    assert torch.allclose(kept + c["excluded"], c["h_minus_ggn"], rtol=1e-10, atol=1e-12)
    assert c["excluded"].norm() > 1e-3 * kept.norm()  # softmax / LN / GELU curvature is real
    for vec in c["components"].values():
        assert vec.norm() > 1e-4


def _copy_into(attention, ref):
    model = TinyTransformer(attention).to(DT)
    src = dict(ref.named_parameters())
    with torch.no_grad():
        for canon_name in CANON + ["norm.weight", "norm.bias"]:
            dict(model.named_parameters())[_model_name(attention, canon_name)].copy_(
                src[canon_name])
    return model


@pytest.mark.parametrize("attention", ["mha", "mha_weights", "sdpa", "explicit"])
def test_transformer_components_match_brute_force(transformer_case, attention):
    c = transformer_case
    model = _copy_into(attention, c["ref"])
    model.eval()
    assert torch.allclose(model(c["x"]), c["ref"](c["x"]))
    order = [_model_name(attention, n) for n in CANON]
    comps = c["components"]

    def hvp(up, down, par):
        _, hv = oba_hvp(model, c["x"], c["y"], c["loss_fn"], upward_delta=up,
                        downward_delta=down, parallel_delta=par)
        assert set(hv) == set(order)  # LayerNorm parameters are not perturbed
        return _flat([hv[n] for n in order])

    # published flags: upward_delta → downstream, downward_delta → upstream (and the other
    # branch of parallel terms), parallel_delta → parallel
    isolated = {"downstream": hvp(1, 0, 0), "upstream": hvp(0, 1, 0),
                "parallel": hvp(0, 1, 1) - hvp(0, 1, 0)}
    for component, got in isolated.items():
        expected = comps[component]
        assert (got - expected).norm() / expected.norm() < 1e-10, component
    full = hvp(1, 1, 1)
    assert torch.allclose(full, sum(isolated.values()), rtol=1e-10, atol=1e-14)
    assert torch.allclose(full, c["h_minus_ggn"] - c["excluded"], rtol=1e-9, atol=1e-12)
    # the flags scale their components: squares, and parallel · downward
    mixed = hvp(2.0, -1.0, 0.5)
    assert torch.allclose(mixed, 4 * comps["downstream"] + comps["upstream"]
                          - 0.5 * comps["parallel"], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- the flags

class TwoBranchNet(nn.Module):
    """q, k, v read the input; Q·Kᵀ and A·V multiply branches (parallel); fc reads A·V (its
    layers before it: q, k, v). ReLU only, so H̃ = H − GGN and each Hessian block between two
    layers belongs to one component."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = F.relu(self.q(x) @ self.k(x).transpose(-2, -1))
        return self.fc(F.relu(a @ self.v(x))).mean(1)


def test_flags_have_the_published_meaning():
    """s_i = θ_i (upward_delta² D_i + downward_delta² U_i + parallel_delta·downward_delta P_i):
    U_i / D_i / P_i = Σ_j (H − GGN)_ij θ_j over the parameters j of the layers before / after /
    parallel to parameter i's layer, H from torch.autograd.functional.hessian."""
    torch.manual_seed(4)
    model = TwoBranchNet().to(DT)
    x = torch.randn(3, 4, 3, dtype=DT)
    y = torch.tensor([0, 2, 1])
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = _flat([params[n].detach() for n in names])

    def logits(vec):
        return torch.func.functional_call(model, dict(zip(names, _unflat(vec, shapes))), (x,))

    hess = torch.autograd.functional.hessian(lambda v: loss_fn(logits(v), y), theta)
    jac = torch.autograd.functional.jacobian(logits, theta).reshape(-1, theta.numel())
    z = logits(theta).detach()
    loss_hess = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), z).reshape(
        z.numel(), z.numel())
    kept = hess - jac.T @ loss_hess @ jac
    layer = torch.cat([torch.full((math.prod(s),), "qkvf".index(n[0])) for n, s in
                       zip(names, shapes)])  # layer index of every flat parameter
    before = {0: [], 1: [], 2: [], 3: [0, 1, 2]}
    after = {0: [3], 1: [3], 2: [3], 3: []}
    parallel = {0: [1, 2], 1: [0, 2], 2: [0, 1], 3: []}

    def component(related):
        out = torch.zeros_like(theta)
        for l_i, l_js in related.items():
            rows = layer == l_i
            cols = torch.isin(layer, torch.tensor(l_js, dtype=layer.dtype))
            out[rows] = kept[rows][:, cols] @ theta[cols]
        return theta * out

    up, down, par = component(before), component(after), component(parallel)
    assert torch.allclose(up + down + par, theta * (kept @ theta), rtol=1e-10, atol=1e-14)
    for c in (up, down, par):
        assert c.norm() > 1e-3 * (up + down + par).norm()

    def scores(**flags):
        s = oba_batch_scores(model, x, y, loss_fn, **flags)
        return _flat([s[n] for n in names])

    def close(a, b):
        assert (a - b).norm() <= 1e-10 * b.norm(), (a - b).norm() / b.norm()

    close(scores(), up + down + par)  # defaults: θ ⊙ H̃θ, as before
    for d in (1.7, -0.6):
        close(scores(upward_delta=d) - scores(upward_delta=0.0), d ** 2 * down)
        close(scores(downward_delta=d) - scores(downward_delta=0.0), d ** 2 * up + d * par)
        close(scores(parallel_delta=d) - scores(parallel_delta=0.0), d * par)
    close(scores(upward_delta=0.5, downward_delta=2.0, parallel_delta=-1.5, delta=0.0),
          0.25 * down + 4 * up - 3 * par)


# ----------------------------------------------------------------------------- side effects

class TrainBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(F.adaptive_avg_pool2d(h, 1).flatten(1)))


def _batches(shape, classes, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(n)]


def test_no_side_effects_and_registry_entry_point():
    torch.manual_seed(1)
    model = TrainBNNet()
    model.train()
    model.bn.eval()  # a mixed-mode model: flags must come back exactly as they were
    model.bn.train()
    model.drop.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = parameter_scores("OBA", model, _batches((4, 3, 6, 6), 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights and BN running statistics, bitwise
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    expected = {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert set(scores) == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert scores[name].shape == p.shape and torch.isfinite(scores[name]).all()
    assert scores["conv.weight"].abs().sum() > 0  # train-mode BN: nonzero inter-layer terms


def test_scores_average_over_batches_and_train_equals_eval():
    torch.manual_seed(2)
    model = ResidualConvNet()
    model.bn = nn.Identity()  # no BatchNorm, no dropout: the mode must not matter
    batches = _batches((3, 2, 4, 4), 4, n=3)
    model.train()
    train_scores = parameter_scores("OBA", model, batches, delta=0.3)
    model.eval()
    eval_scores = parameter_scores("OBA", model, batches, delta=0.3)
    assert not model.training
    per_batch = [oba_batch_scores(model, x, y, nn.CrossEntropyLoss(), delta=0.3)
                 for x, y in batches]
    for name in train_scores:
        assert torch.allclose(train_scores[name], eval_scores[name], rtol=1e-5, atol=1e-8)
        mean = sum(s[name] for s in per_batch) / len(per_batch)
        assert torch.allclose(eval_scores[name], mean, rtol=1e-5, atol=1e-8)


def test_bad_options_are_one_line_errors():
    model = ReluMLP()
    batches = _batches((2, 5), 3, n=1)
    with pytest.raises(CriterionError, match="order"):
        parameter_scores("OBA", model, batches, order=2)
    with pytest.raises(CriterionError, match="upward_delta"):
        parameter_scores("OBA", model, batches, upward_delta="big")


def test_general_path_without_the_weight_shortcut(transformer_case, monkeypatch):
    """The shortcut for operands whose tangent equals their value (weights, δθ = θ) and the
    general path (explicit B(X, Ẇ) terms) give the same H̃δθ."""
    import pruners.oba as oba
    monkeypatch.setattr(oba, "_same_value", lambda tangent, primal: False)
    test_hvp_equals_hessian_minus_gauss_newton(ResidualConvNet, (5, 2, 4, 4))
    test_transformer_components_match_brute_force(transformer_case, "mha")


# ----------------------------------------------------------------------------- randomness

class DropoutMLP(ReluMLP):
    """ReluMLP with dropout (p = 0.5) after the first ReLU."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.drop(F.relu(self.fc1(x))))))


class FixedMaskMLP(DropoutMLP):
    """DropoutMLP with one given dropout mask instead of a random one."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.mask * F.relu(self.fc1(x)))))


def test_dropout_value_and_tangent_share_one_mask():
    """Calls other than products run twice (value with autograd, tangent without); the random
    generator is rewound between the runs, so a train-mode dropout masks value and tangent
    alike: OBA then equals brute force on the network with that mask fixed."""
    torch.manual_seed(6)
    model = DropoutMLP().to(DT).train()
    x, y = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    torch.manual_seed(11)
    mask = model.drop(torch.ones(7, 6, dtype=DT))  # the draw the scoring pass will make
    assert 0 < int((mask == 0).sum()) < mask.numel()
    reference = FixedMaskMLP(mask).to(DT)
    reference.load_state_dict(model.state_dict())
    names, _, expected = _brute_h_minus_ggn(reference, x, y, nn.CrossEntropyLoss())
    torch.manual_seed(11)
    _, hv = oba_hvp(model, x, y, nn.CrossEntropyLoss())
    after_scoring = torch.get_rng_state()
    got = _flat([hv[n] for n in names])
    assert (got - expected).norm() / expected.norm() < 1e-10
    # the generator moved on exactly as for one forward pass, not two
    torch.manual_seed(11)
    model.drop(torch.ones(7, 6, dtype=DT))
    assert torch.equal(after_scoring, torch.get_rng_state())


# ----------------------------------------------------------------------------- calls run twice

class SharedWeightAuxNet(nn.Module):
    """A conv used twice (one weight, two products) and an auxiliary head the loss may skip."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.aux, self.aux_fc = nn.Conv2d(3, 2, 3, padding=1), nn.Linear(72, 3)
        self.fc = nn.Linear(108, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(h.flatten(1)), self.aux_fc(self.aux(h).flatten(1))


@pytest.mark.parametrize("aux_weight", [0.0, 0.5])
def test_shared_weight_and_unreached_head_match_brute_force(aux_weight):
    """The probe path (weight terms made while the ordinary backward passes Z) with a weight
    used by two calls, and with a head the loss does not reach (its probes never fire)."""
    torch.manual_seed(5)
    model = SharedWeightAuxNet().to(DT)
    x, y = torch.randn(5, 2, 6, 6, dtype=DT), torch.randint(0, 3, (5,))

    def loss_fn(out, target):
        return F.cross_entropy(out[0], target) + aux_weight * F.cross_entropy(out[1], target)
    names, _, expected = _brute_h_minus_ggn(model, x, y, loss_fn)
    _, hv = oba_hvp(model, x, y, loss_fn)
    got = _flat([hv[n] for n in names])
    assert (got - expected).norm() / expected.norm() < 1e-10
    if aux_weight == 0:
        assert hv["aux.weight"].abs().max() == 0


class BNMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def test_calls_run_twice_have_their_side_effects_once():
    """The second run of a call (for the tangent) gets copies of module buffers, and calls that
    write into an argument or act on the tensor object run once: a train-mode BatchNorm updates
    its running statistics once even when oba_hvp is called outside the scoring context, an
    in-place op overload multiplies once (value and tangent), an attribute set lands on the
    real tensor."""
    torch.manual_seed(7)
    x, y = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    model = BNMLP().to(DT).train()
    reference = BNMLP().to(DT).train()
    reference.load_state_dict(model.state_dict())
    reference(x)
    oba_hvp(model, x, y, nn.CrossEntropyLoss())
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name

    class InPlaceOverload(ReluMLP):
        def forward(self, x):
            h = F.relu(self.fc1(x)) * 1.0
            torch.ops.aten.mul_.Tensor(h, 3.0)  # an op overload that writes into its argument
            return self.fc3(F.relu(self.fc2(h)))

    class Plain(ReluMLP):
        def forward(self, x):
            return self.fc3(F.relu(self.fc2(3.0 * F.relu(self.fc1(x)))))
    torch.manual_seed(8)
    overload = InPlaceOverload().to(DT)
    plain = Plain().to(DT)
    plain.load_state_dict(overload.state_dict())
    _, hv_overload = oba_hvp(overload, x, y, nn.CrossEntropyLoss())
    _, hv_plain = oba_hvp(plain, x, y, nn.CrossEntropyLoss())
    for name in hv_plain:
        assert torch.allclose(hv_overload[name], hv_plain[name], rtol=1e-12, atol=1e-14), name

    class AttributeSet(ReluMLP):
        def forward(self, x):
            h = F.relu(self.fc1(x))
            g = torch.zeros_like(h)
            g.data = h  # acts on g itself: must not land on a stand-in
            assert torch.equal(g, h)
            return self.fc3(F.relu(self.fc2(h)))
    oba_hvp(AttributeSet().to(DT), x, y, nn.CrossEntropyLoss())


def test_forward_without_autograd_scores_zero():
    """A model that runs its forward under no_grad gives zero scores, not an error."""
    class NoGrad(ReluMLP):
        def forward(self, x):
            with torch.no_grad():
                return super().forward(x)
    torch.manual_seed(9)
    _, hv = oba_hvp(NoGrad().to(DT), torch.randn(4, 5, dtype=DT), torch.tensor([0, 1, 2, 0]),
                    nn.CrossEntropyLoss())
    assert all(v.abs().max() == 0 for v in hv.values())

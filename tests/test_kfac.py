"""K-FAC statistics and the four K-FAC criteria against explicit per-example formulas."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruners import kfac
from pruners.kfac_criteria import (KRON_OBS, kron_obs_compensate, obd_obs_loss_change,
                                   obs_removal_update)
from pruners.registry import get_method, parameter_scores
from utils import log


pytestmark = pytest.mark.usefixtures("float64_default")  # float64 maths


class LinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x)), inplace=True).flatten(1))


def _bn_with_stats(net):
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 1.5)
    return net


def explicit_patches(conv, x):
    """im2col by explicit slicing of the zero-padded input: (positions, in·kh·kw)."""
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    out_h = (xp.shape[-2] - kh) // sh + 1
    out_w = (xp.shape[-1] - kw) // sw + 1
    rows = []
    for i in range(out_h):
        for j in range(out_w):
            rows.append(xp[:, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 1, 1, 1), (3, 2, 0, 1), ((3, 2), (2, 1), (1, 0), (2, 1)), (1, 1, 0, 1), (3, 1, "same", 2)])
def test_conv_patches_match_unfold(kernel, stride, padding, dilation):
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 2, 7, 6)
    patches = kfac.conv_patches(conv, x)
    # the patches reproduce the convolution itself
    out = patches @ conv.weight.reshape(3, -1).t() + conv.bias
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-12)
    with_bias = kfac.conv_patches(conv, x, bias_column=True)
    assert torch.equal(with_bias[..., :-1], patches) and bool((with_bias[..., -1] == 1).all())


def explicit_statistics(model, layer, x, y, patches_fn):
    """A, S and the per-example diagonal Fisher by loops over single examples."""
    A = S = Fd = 0
    positions = 0
    for n in range(x.shape[0]):
        captured = {}
        handle = layer.register_forward_hook(lambda m, i, o: captured.update(a=i[0], z=o))
        loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
        handle.remove()
        z = captured["z"]
        s = torch.autograd.grad(loss, z, retain_graph=True)[0][0]          # per-example loss
        a = patches_fn(captured["a"][0].detach())                          # (P, d)
        if layer.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
        s = s.reshape(s.shape[0], -1).t() if s.dim() == 3 else s.reshape(1, -1)   # (P, out)
        A = A + a.t() @ a
        positions += a.shape[0]
        S = S + s.t() @ s
        grads = torch.autograd.grad(loss, [layer.weight] + ([layer.bias] if layer.bias is not None else []))
        g = grads[0].reshape(grads[0].shape[0], -1)
        if layer.bias is not None:
            g = torch.cat([g, grads[1].reshape(-1, 1)], 1)
        Fd = Fd + g ** 2
    return A / positions, S / x.shape[0], Fd / x.shape[0]


# 2: A is accumulated in 2-4 block-rows on and below the diagonal and mirrored (the path of
# wide layers); 512: one full product (these layers are narrow).
GRAM_BLOCKS = pytest.mark.parametrize("gram_min_block", [512, 2])


@GRAM_BLOCKS
def test_linear_statistics_match_explicit_formulas(gram_min_block, monkeypatch):
    monkeypatch.setattr(kfac, "_GRAM_MIN_BLOCK", gram_min_block)
    torch.manual_seed(0)
    net = LinearNet()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    stats = kfac.collect_kfac_statistics(net, [(x[:4], y[:4]), (x[4:], y[4:])], nn.CrossEntropyLoss(),
                                         fisher_type="empirical", channel_input=True, diagonal=True)
    for name, layer in (("fc1", net.fc1), ("fc2", net.fc2)):
        A, S, Fd = explicit_statistics(net, layer, x, y, lambda a: a.reshape(1, -1))
        assert torch.allclose(stats[name].A, A, atol=1e-12)
        assert torch.allclose(stats[name].S, S, atol=1e-12)
        assert torch.allclose(stats[name].fisher_diag, Fd, atol=1e-12)
        d = layer.in_features
        assert torch.allclose(stats[name].A_channels, A[:d, :d], atol=1e-12)
    assert stats["fc1"].A.shape == (5, 5) and stats["fc2"].A.shape == (5, 5)   # fc1 has a bias


@GRAM_BLOCKS
def test_conv_statistics_match_explicit_formulas(gram_min_block, monkeypatch):
    monkeypatch.setattr(kfac, "_GRAM_MIN_BLOCK", gram_min_block)
    torch.manual_seed(1)
    net = _bn_with_stats(ConvNet())
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 4, (3,))
    net.eval()  # the statistics follow the caller's mode (the registry sets --score_mode)
    stats = kfac.collect_kfac_statistics(net, [(x, y)], nn.CrossEntropyLoss(),
                                         fisher_type="empirical", channel_input=True, diagonal=True)
    A, S, Fd = explicit_statistics(net, net.conv, x, y, lambda a: explicit_patches(net.conv, a))
    st = stats["conv"]
    assert st.A.shape == (2 * 9 + 1, 2 * 9 + 1)
    assert torch.allclose(st.A, A, atol=1e-12)
    assert torch.allclose(st.S, S, atol=1e-12)
    assert torch.allclose(st.fisher_diag, Fd, atol=1e-12)
    channels = x.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.allclose(st.A_channels, channels.t() @ channels / channels.shape[0], atol=1e-12)


def test_true_fisher_uses_sampled_targets():
    torch.manual_seed(2)
    net = LinearNet()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(5)
    true_stats = kfac.collect_kfac_statistics(net, [(x, y)], nn.CrossEntropyLoss())
    torch.manual_seed(5)
    sampled = kfac.sample_targets(net(x))
    emp = kfac.collect_kfac_statistics(net, [(x, sampled)], nn.CrossEntropyLoss(),
                                       fisher_type="empirical")
    assert torch.allclose(true_stats["fc1"].S, emp["fc1"].S)
    with pytest.raises(ValueError, match="fisher_type"):
        kfac.collect_kfac_statistics(net, [(x, y)], nn.CrossEntropyLoss(), fisher_type="exact")


def test_collection_leaves_buffers_modes_and_grads_alone():
    torch.manual_seed(3)
    net = _bn_with_stats(ConvNet()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 4, (4,))
    kfac.collect_kfac_statistics(net, [(x, y)], nn.CrossEntropyLoss(), diagonal=True)
    assert net.training and net.bn.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert not net.conv._forward_hooks and not net.fc._forward_hooks


def _factors(seed=4):
    torch.manual_seed(seed)
    net = _bn_with_stats(ConvNet())
    batches = [(torch.randn(4, 2, 5, 5), torch.randint(0, 4, (4,))) for _ in range(2)]
    stats = kfac.collect_kfac_statistics(net, batches, nn.CrossEntropyLoss(), fisher_type="empirical",
                                         diagonal=True)
    return net, batches, stats


def _theta(layer):
    return kfac.weight_matrix(layer).detach()


def _as_matrix(scores, name, layer):
    w = scores[f"{name}.weight"].reshape(layer.weight.shape[0], -1)
    return torch.cat([w, scores[f"{name}.bias"].reshape(-1, 1)], 1)


@pytest.mark.parametrize("method", ["Kron-OBD", "Kron-OBS", "C-OBD", "C-OBS"])
def test_criteria_match_explicit_kronecker_formulas(method):
    net, batches, stats = _factors()
    damping = 1e-2
    options = {"fisher_type": "empirical"}
    if method != "Kron-OBD":
        options["damping"] = damping
    scores = parameter_scores(method, net, batches, **options)
    for name, layer in (("conv", net.conv), ("fc", net.fc)):
        st = stats[name]
        theta = _theta(layer)
        A, S = st.A, st.S
        Ad, Sd = kfac.damped(A, damping), kfac.damped(S, damping)
        got = _as_matrix(scores, name, layer)
        assert got.shape == theta.shape
        if method == "C-OBD":
            expected = theta ** 2 * st.fisher_diag
        elif method == "C-OBS":
            F_inv = torch.kron(torch.linalg.inv(Sd), torch.linalg.inv(Ad))   # row-major vec(θ)
            expected = theta ** 2 / torch.diagonal(F_inv).reshape(theta.shape)
        else:
            Sfull = S if method == "Kron-OBD" else Sd
            Afull = A if method == "Kron-OBD" else Ad
            Fm = torch.kron(Sfull, Afull)
            filters = []
            for i in range(theta.shape[0]):
                block = slice(i * theta.shape[1], (i + 1) * theta.shape[1])
                quad = theta[i] @ Fm[block, block] @ theta[i]      # S_ii θ_iᵀAθ_i
                if method == "Kron-OBD":
                    filters.append(0.5 * quad)
                else:
                    filters.append(0.5 * quad / Sfull[i, i] / torch.linalg.inv(Sfull)[i, i])
            expected = torch.stack(filters)
            got = got.sum(1)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-14), (method, name)


def test_c_obs_says_when_an_input_factor_has_fewer_samples_than_columns(capsys, monkeypatch):
    """conv: A is 19 × 19 with 9 patch rows per image; fc: 28 × 28 with one row per image.
    8 images leave fc singular (8 rows < 28) and warn once, naming fc and the 28 images it
    needs; 28 images fill both factors and say nothing."""
    monkeypatch.setattr(log, "_said", set())
    torch.manual_seed(0)
    net = _bn_with_stats(ConvNet())

    def batches(n):
        return [(torch.randn(n, 2, 5, 5), torch.randint(0, 4, (n,)))]

    stats = kfac.collect_kfac_statistics(net, batches(8), nn.CrossEntropyLoss())
    assert (stats["conv"].input_samples, stats["fc"].input_samples) == (72, 8)
    for _ in range(2):
        parameter_scores("C-OBS", net, batches(8))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 layers" in err[0] and "worst: fc, 8 rows for 28 columns" in err[0]
    assert "at least 28 images" in err[0] and "--iters_per_step" in err[0]
    monkeypatch.setattr(log, "_said", set())
    parameter_scores("C-OBS", net, batches(28))
    assert capsys.readouterr().err == ""


def test_kron_obs_update_equals_explicit_obs_step():
    net, batches, stats = _factors()
    damping = 1e-2
    parameter_scores("Kron-OBS", net, batches, fisher_type="empirical", damping=damping)
    state = KRON_OBS.state
    theta = _theta(net.conv)
    Ad, Sd = kfac.damped(stats["conv"].A, damping), kfac.damped(stats["conv"].S, damping)
    # explicit OBS on vec(θ) (row-major) with F = S ⊗ A, removing all entries of filters P
    P = [0, 2]
    F_inv = torch.linalg.inv(torch.kron(Sd, Ad))
    d = theta.shape[1]
    idx = torch.tensor([i * d + j for i in P for j in range(d)])
    vec = theta.reshape(-1)
    delta = -F_inv[:, idx] @ torch.linalg.solve(F_inv[idx][:, idx], vec[idx])
    expected = (vec + delta).reshape(theta.shape)
    get_method("Kron-OBS").compensate(net, {net.conv: P}, state)
    assert torch.allclose(_theta(net.conv), expected, atol=1e-10)
    assert torch.all(_theta(net.conv)[P] == 0)
    # single filter: −S⁻¹e_i ⊗ θ_i / [S⁻¹]_ii
    S_inv = torch.linalg.inv(Sd)
    one = obs_removal_update(theta, S_inv, [1])
    assert torch.allclose(one, -torch.outer(S_inv[:, 1], theta[1]) / S_inv[1, 1])


def test_kron_obs_update_can_be_switched_off():
    net, batches, _ = _factors()
    parameter_scores("Kron-OBS", net, batches, fisher_type="empirical", obs_update=False)
    before = _theta(net.conv).clone()
    kron_obs_compensate(net, {net.conv: [0]}, KRON_OBS.state)
    assert torch.equal(_theta(net.conv), before)


def test_unknown_option_and_bad_damping_are_user_errors():
    net, batches, _ = _factors()
    with pytest.raises(ValueError, match="does not take"):
        parameter_scores("C-OBS", net, batches, order=2)
    with pytest.raises(ValueError, match="damping"):
        parameter_scores("C-OBS", net, batches, damping=0)


def test_scores_leave_model_unchanged():
    net, batches, _ = _factors()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in ("C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS"):
        parameter_scores(method, net, batches)
    assert net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_worked_example_obs_wins_for_one_obd_for_two():
    theta = torch.tensor([1.0, 1.0, 1.0])
    H = torch.tensor([[1.0, 0.99, 0.0], [0.99, 1.0, 0.01], [0.0, 0.01, 0.5]])
    one = obd_obs_loss_change(theta, H, 1)
    assert one["obd_removed"] == [2] and one["obs_removed"] in ([0], [1])
    assert one["obs_loss_change"] < one["obd_loss_change"]
    assert one["obd_loss_change"] == pytest.approx(0.25)
    two = obd_obs_loss_change(theta, H, 2)
    assert two["obs_removed"] == [0, 1]
    assert two["obd_loss_change"] < two["obs_loss_change"]
    # brute force: the OBS loss change is the minimum over the surviving weight
    w3 = torch.linspace(-2, 3, 50001)
    deltas = torch.stack([-torch.ones_like(w3), -torch.ones_like(w3), w3 - 1], 1)
    brute = (0.5 * torch.einsum("ni,ij,nj->n", deltas, H, deltas)).min()
    assert two["obs_loss_change"] == pytest.approx(float(brute), abs=1e-6)


def test_spd_inverse_and_its_diagonal_match_dense_inverse():
    """The triangular-solve inverse (and the diagonal-only variant C-OBS uses) equal the
    plain dense inverse up to round-off, in the factor's dtype."""
    torch.manual_seed(3)
    samples = torch.randn(7, 12)  # rank 7 < 12: only the damping makes it invertible
    factor = kfac.damped(samples.t() @ samples / 7, 1e-2)
    reference = torch.linalg.inv(factor)
    torch.testing.assert_close(kfac.spd_inverse(factor), reference, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kfac.spd_inverse_diagonal(factor), torch.diagonal(reference),
                               rtol=1e-9, atol=1e-9)
    as_float = kfac.spd_inverse_diagonal(factor.float())
    assert as_float.dtype == torch.float32
    torch.testing.assert_close(as_float, torch.diagonal(reference).float(), rtol=1e-4, atol=1e-4)


def test_inverse_diagonal_retries_in_float64_when_float32_cholesky_fails(capsys, monkeypatch):
    """C-OBS factorises in the factor's own precision; a float32 factor that is positive
    definite but too ill-conditioned for a float32 Cholesky is done again in float64, silently
    (the pseudo-inverse and its warning are for factors that fail in float64 too)."""
    from utils import log
    monkeypatch.setattr(log, "_said", set())
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=generator))
    factor = ((rotation * torch.logspace(0, -9, 6, dtype=torch.float64)) @ rotation.t()).float()
    factor = (factor + factor.t()) / 2
    assert torch.linalg.cholesky_ex(factor).info.item() != 0
    assert torch.linalg.eigvalsh(factor.double()).min() > 0
    got = kfac.spd_inverse_diagonal(factor)
    assert got.dtype == torch.float32
    expected = torch.diagonal(torch.linalg.inv(factor.double())).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("size, min_block", [(13, 2), (29, 3), (600, 256)])
def test_blocked_inverse_diagonal_matches_dense_inverse(size, min_block, monkeypatch):
    """spd_inverse_diagonal solves L⁻¹ a block of columns at a time; uneven block edges and
    every block count (up to the cap of 8) give the dense inverse's diagonal."""
    monkeypatch.setattr(kfac, "_INVERSE_DIAGONAL_MIN_BLOCK", min_block)
    torch.manual_seed(size)
    samples = torch.randn(size // 2, size, dtype=torch.float64)
    factor = kfac.damped(samples.t() @ samples / samples.shape[0], 1e-3)
    torch.testing.assert_close(kfac.spd_inverse_diagonal(factor),
                               torch.diagonal(torch.linalg.inv(factor)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("positions", [1, 4, 13, 30])
@pytest.mark.parametrize("chunk", [1 << 24, 50])
def test_both_per_example_square_forms_match_explicit_gradients(positions, chunk, monkeypatch):
    """C-OBD's diagonal Σ_n (Σ_t s_nt a_ntᵀ)²: the pair form (small position counts) and the
    per-example-gradient form (large ones) both equal an explicit loop over examples."""
    torch.manual_seed(positions)
    a, s = torch.randn(5, positions, 7), torch.randn(5, positions, 3)
    explicit = sum((s[n].t() @ a[n]) ** 2 for n in range(5))
    monkeypatch.setattr(kfac, "_CHUNK_ELEMENTS", chunk)  # 50: a few examples per chunk
    for form in (kfac.per_example_squares_by_pairs, kfac.per_example_squares_by_gradients):
        torch.testing.assert_close(form(a, s), explicit, rtol=1e-12, atol=1e-12)
    assert kfac._pairs_are_cheaper(4) and not kfac._pairs_are_cheaper(30)


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
    lambda: nn.Conv2d(2, 4, (3, 2), dilation=(2, 1), padding="same", bias=False),
    lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Linear(6, 3)])
def test_weight_products_equal_theta_times_full_factor(make):
    """Kron-OBD/OBS read θA and mean(diag A) from the weight-gradient-style products; they equal
    θ @ A and A's mean diagonal of the im2col factor."""
    torch.manual_seed(4)
    layer = make()
    net = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(4, 2, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(4, 5, 6)
    net(x)  # materialise the lazy layer
    batches = [(x[:2], torch.randint(0, 3, (2,))), (x[2:], torch.randint(0, 3, (2,)))]
    options = {"layers": {"l": layer}, "fisher_type": "empirical"}
    full = kfac.collect_kfac_statistics(net, batches, nn.CrossEntropyLoss(), **options)
    products = kfac.collect_kfac_statistics(net, batches, nn.CrossEntropyLoss(), full_input=False,
                                            weight_products=True, **options)
    A = full["l"].A
    torch.testing.assert_close(products["l"].theta_A, _theta(layer) @ A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(products["l"].A_diagonal_mean, torch.diagonal(A).mean(),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(products["l"].S, full["l"].S, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# A of stride-1 convs from shifted channel products (conv_input_gram_by_shifts)

_BY_SHIFTED_PRODUCTS = kfac.by_shifted_products


def _input_factor(layer, batches, shifts, monkeypatch):
    """A from the accumulator, by shifted products (`shifts`) or by the im2col Gram."""
    monkeypatch.setattr(kfac, "by_shifted_products", lambda m: shifts and _BY_SHIFTED_PRODUCTS(m))
    acc = kfac._Accumulator(layer, full_input=True, channel_input=False, diagonal=False)
    assert acc.by_shifts == shifts
    for x in batches:
        z = layer(x).detach()
        acc.add(x, z, torch.zeros_like(z), x.shape[0])
    return acc.result(sum(x.shape[0] for x in batches)).A


def _assert_same_factor(got, expected, rtol=1e-12):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel", [1, 3, 5, (3, 1), (1, 3), (3, 5), (2, 3)])
def test_shifted_products_equal_the_im2col_gram(kernel, padding_mode, monkeypatch):
    """Every stride-1 geometry: dilation 1 and 2, padding 0/1/2/'same'/'valid' (asymmetric for
    the even kernel), maps from 1×1 to 8×8, with and without bias, over two calls."""
    torch.manual_seed(0)
    checked = 0
    for dilation in (1, 2):
        for padding in (0, 1, 2, "same", "valid"):
            for size in ((1, 1), (2, 2), (3, 5), (8, 8)):
                for bias in (True, False):
                    conv = nn.Conv2d(3, 2, kernel, dilation=dilation, padding=padding,
                                     padding_mode=padding_mode, bias=bias)
                    batches = [torch.randn(2, 3, *size), torch.randn(3, 3, *size)]
                    try:
                        conv(batches[0])
                    except RuntimeError:  # no output position, or padding wider than the map
                        continue
                    expected = _input_factor(conv, batches, False, monkeypatch)
                    _assert_same_factor(_input_factor(conv, batches, True, monkeypatch), expected)
                    checked += 1
    assert checked >= 20


@pytest.mark.parametrize("chunk", [1 << 24, 300])
def test_shifted_products_equal_the_im2col_gram_on_many_examples(chunk, monkeypatch):
    """The im2col path unfolds a few examples at a time (300: one or two per chunk); the sums
    agree whatever the chunking, and across calls of different batch sizes."""
    monkeypatch.setattr(kfac, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    batches = [torch.randn(17, 4, 6, 5), torch.randn(6, 4, 6, 5)]
    _assert_same_factor(_input_factor(conv, batches, True, monkeypatch),
                        _input_factor(conv, batches, False, monkeypatch))


def test_shifted_products_in_float32_are_within_round_off(monkeypatch):
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 8, 3, padding=1).float()
    batches = [torch.randn(8, 16, 8, 8, dtype=torch.float32)]
    got = _input_factor(conv, batches, True, monkeypatch)
    assert got.dtype == torch.float32
    reference = _input_factor(conv.double(), [x.double() for x in batches], False, monkeypatch)
    _assert_same_factor(got.double(), reference, rtol=1e-5)


def test_first_call_overwrites_whatever_memory_it_gets():
    """The blocks are allocated uninitialised: every one must be written (blocks of shifts whose
    products all meet padding are zeroed). Freed NaNs of the same size are likely reused."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 1, 1)  # 1×1 map: only the centre offset sees data
    for _ in range(3):
        garbage = torch.full((45, 3, 3), float("nan"))
        del garbage
        blocks = kfac.conv_input_gram_by_shifts(conv, x)
        assert bool(torch.isfinite(blocks).all())
        A = kfac.gram_from_shift_blocks(blocks, (3, 3))
        a = kfac.conv_patches(conv, x).reshape(-1, 27)
        _assert_same_factor(A, a.t() @ a)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
                                  lambda: nn.Conv2d(2, 3, (3, 1), stride=(1, 2), padding=1),
                                  lambda: nn.Linear(4, 3)])
def test_strided_convs_and_linear_layers_keep_the_patch_gram(make):
    # so do layers off the CPU (a GPU runs one large im2col GEMM better)
    assert not kfac.by_shifted_products(nn.Conv2d(2, 3, 3, padding=1, device="meta"))
    torch.manual_seed(4)
    layer = make()
    assert not kfac.by_shifted_products(layer)
    x = torch.randn(3, 2, 5, 6) if isinstance(layer, nn.Conv2d) else torch.randn(3, 5, 4)
    acc = kfac._Accumulator(layer, full_input=True, channel_input=False, diagonal=False)
    assert not acc.by_shifts
    z = layer(x).detach()
    acc.add(x, z, torch.zeros_like(z), 3)
    a = kfac._input_samples(layer, x, bias_column=True)
    a = a.reshape(-1, a.shape[-1])
    _assert_same_factor(acc.result(3).A, a.t() @ a / a.shape[0])


def _shift_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 3, 3, padding=2, dilation=2, bias=False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))


def test_factor_over_two_batches_equals_factor_over_their_union():
    net = _shift_net()
    x, y = torch.randn(7, 2, 5, 5), torch.randint(0, 3, (7,))
    options = {"fisher_type": "empirical"}
    loss = nn.CrossEntropyLoss()
    split = kfac.collect_kfac_statistics(net, [(x[:3], y[:3]), (x[3:], y[3:])], loss, **options)
    whole = kfac.collect_kfac_statistics(net, [(x, y)], loss, **options)
    assert kfac.by_shifted_products(net[0]) and kfac.by_shifted_products(net[2])
    for name in ("0", "2", "5"):
        _assert_same_factor(split[name].A, whole[name].A)
        assert split[name].input_samples == whole[name].input_samples


def test_process_sums_of_the_shifted_factor_add_up(monkeypatch):
    """_sum_over_processes with two simulated processes: every running sum of the shifted path
    (blocks and bias column) is all-reduced, so the result equals one process over all batches."""
    net = _shift_net()
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    options = {"fisher_type": "empirical"}
    whole = kfac.collect_kfac_statistics(net, [(x, y)], nn.CrossEntropyLoss(), **options)
    monkeypatch.setattr(kfac, "is_distributed", lambda: True)
    other = {}  # the other process's sums (copies: result() normalises its own in place)

    def record(sums):
        other.update({k: v.clone() for k, v in sums.items()})
        return {k: v.clone() for k, v in sums.items()}
    monkeypatch.setattr(kfac, "all_reduce_dict", record)
    counts = []
    monkeypatch.setattr(kfac, "all_reduce_sum", lambda t: counts.append(t.clone()) or t.clone())
    kfac.collect_kfac_statistics(net, [(x[4:], y[4:])], nn.CrossEntropyLoss(), **options)
    assert "0\0A" in other and "0\0A_bias" in other
    monkeypatch.setattr(kfac, "all_reduce_dict",
                        lambda sums: {k: v + other[k] for k, v in sums.items()})
    added = iter(counts)
    monkeypatch.setattr(kfac, "all_reduce_sum", lambda t: t + next(added))
    shared = kfac.collect_kfac_statistics(net, [(x[:4], y[:4])], nn.CrossEntropyLoss(), **options)
    for name in ("0", "2", "5"):
        _assert_same_factor(shared[name].A, whole[name].A)
        _assert_same_factor(shared[name].S, whole[name].S)

"""EigenDamage: exact re-parameterisation, bottleneck sizes, iterative folding, depthwise cores."""
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pruners.eigendamage import (EigenBottleneck, EigenDamageError, collect_eigen_statistics,
                                 cp_decompose, eigendamage_prune, prune_to_macs_target)
from pruners.registry import parameter_scores
from utils.flops import count_macs, count_params

LOSS = nn.CrossEntropyLoss()


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallVGG(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), nn.MaxPool2d(2), conv_bn(8, 12))
        self.classifier = nn.Linear(12, classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.block = Block(8, 12, 2)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _batches(shape=(3, 8, 8), classes=5, n=2, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("net", [SmallVGG, SmallResNet])
def test_nothing_removed_keeps_outputs(net):
    torch.manual_seed(0)
    model = _randomise_bn(net())
    batches = _batches()
    stats = collect_eigen_statistics(model, batches, LOSS)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = eigendamage_prune(model, stats, 0.0, allow_growth=True)
    bottlenecks = [m for m in rebuilt.modules() if isinstance(m, EigenBottleneck)]
    assert len(bottlenecks) == len(_layers(model))
    x = batches[0][0]
    assert torch.allclose(rebuilt(x), model(x), atol=1e-5)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    # without allow_growth nothing is worth replacing when nothing is removed
    same = eigendamage_prune(model, stats, 0.0)
    assert not any(isinstance(m, EigenBottleneck) for m in same.modules())


def test_statistics_leave_batchnorm_buffers_and_mode():
    model = _randomise_bn(SmallResNet()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collect_eigen_statistics(model, _batches(), LOSS)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _theta(stats, name, weight):
    """Θ (out, in) by explicit eigendecompositions of the collected factors."""
    lam_a, q_a = torch.linalg.eigh(stats.layers[name].A_channels.double())
    lam_s, q_s = torch.linalg.eigh(stats.layers[name].S.double())
    w = weight.detach().double()
    if w.dim() == 2:
        w = w[:, :, None, None]
    energy = sum((q_s.t() @ w[:, :, i, j] @ q_a) ** 2 for i in range(w.shape[2]) for j in range(w.shape[3]))
    return energy * torch.outer(lam_s.clamp_min(0), lam_a.clamp_min(0))


def test_ratio_gives_hand_computed_params_and_macs():
    torch.manual_seed(1)
    model = TwoLayer()
    batches = _batches(shape=(4, 6, 6), classes=3)
    stats = collect_eigen_statistics(model, batches, LOSS)
    ratio, cap = 0.4, 0.7
    pruned = eigendamage_prune(model, stats, ratio, max_pruning_ratio=cap, allow_growth=True)
    # hand computation: rank every direction (classifier outputs excluded), drop the lowest
    th_c, th_f = _theta(stats, "conv", model.conv.weight), _theta(stats, "fc", model.fc.weight)
    entries = ([("conv_in", i, v) for i, v in enumerate(th_c.sum(0))] +
               [("conv_out", i, v) for i, v in enumerate(th_c.sum(1))] +
               [("fc_in", i, v) for i, v in enumerate(th_f.sum(0))])
    removed = sorted(entries, key=lambda e: float(e[2]))[:round(ratio * len(entries))]
    width = {"conv_in": 4, "conv_out": 6, "fc_in": 6}
    rank = {k: max(w - sum(e[0] == k for e in removed), math.ceil((1 - cap) * w)) for k, w in width.items()}
    assert any(rank[k] < width[k] for k in rank)
    r_in, r_out, r_fc = rank["conv_in"], rank["conv_out"], rank["fc_in"]
    assert pruned.conv.core.weight.shape == (r_out, r_in, 3, 3)
    assert pruned.fc.core.weight.shape == (3, r_fc)
    params = (r_in * 4 + r_out * r_in * 9 + 6 * r_out + 6) + (r_fc * 6 + 3 * r_fc + 3 * 3 + 3)
    macs = 36 * (r_in * 4 + r_out * r_in * 9 + 6 * r_out) + (r_fc * 6 + 3 * r_fc + 3 * 3)
    example = torch.randn(1, 4, 6, 6)
    assert count_params(pruned) == params
    assert count_macs(pruned, example) == macs
    # rotations are fixed, the core and the bias train
    assert not pruned.conv.rotate_in.weight.requires_grad
    assert pruned.conv.core.weight.requires_grad and pruned.conv.rotate_out.bias.requires_grad


def test_cap_and_classifier_outputs():
    torch.manual_seed(2)
    model = _randomise_bn(SmallVGG())
    stats = collect_eigen_statistics(model, _batches(), LOSS)
    pruned = eigendamage_prune(model, stats, 1.0, max_pruning_ratio=0.5, allow_growth=True)
    assert pruned.classifier.core.weight.shape[0] == 5    # outputs untouched
    assert pruned.classifier.core.weight.shape[1] == 6    # half of 12 inputs
    for name in ("features.0.0", "features.1.0", "features.3.0"):
        core = pruned.get_submodule(name).core
        original = model.get_submodule(name)
        assert core.in_channels == math.ceil(0.5 * original.in_channels)
        assert core.out_channels == math.ceil(0.5 * original.out_channels)
    with pytest.raises(ValueError, match="max_pruning_ratio"):
        eigendamage_prune(model, stats, 0.5, max_pruning_ratio=1.5)


def test_bottleneck_model_pickles():
    model = _randomise_bn(SmallResNet())
    stats = collect_eigen_statistics(model, _batches(), LOSS)
    pruned = eigendamage_prune(model, stats, 0.3, allow_growth=True)
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), pruned(x))


def _effective(module):
    """R_out · core · R_in per kernel position, as (out, in, kh, kw)."""
    r_in = module.rotate_in.weight.reshape(module.rotate_in.weight.shape[:2]).double()
    r_out = module.rotate_out.weight.reshape(module.rotate_out.weight.shape[:2]).double()
    return torch.einsum("os,sikl,ia->oakl", r_out, module.core.weight.double(), r_in)


def test_two_rounds_fold_bases_and_stay_three_ops_deep():
    torch.manual_seed(3)
    model = _randomise_bn(SmallVGG())
    batches = _batches()
    first = eigendamage_prune(model, collect_eigen_statistics(model, batches, LOSS), 0.25,
                              allow_growth=True)
    stats2 = collect_eigen_statistics(first, batches, LOSS)
    assert set(stats2.layers) == {"features.0.0", "features.1.0", "features.3.0", "classifier"}
    second = eigendamage_prune(first, stats2, 0.25, allow_growth=True)
    for name in stats2.layers:
        layer = second.get_submodule(name)
        assert isinstance(layer, EigenBottleneck)
        assert [n for n, _ in layer.named_children()] == ["rotate_in", "core", "rotate_out"]
        assert all(isinstance(c, (nn.Conv2d, nn.Linear)) for c in layer.children())
        r_in = layer.rotate_in.weight.reshape(layer.rotate_in.weight.shape[:2]).double()
        assert torch.allclose(r_in @ r_in.t(), torch.eye(r_in.shape[0], dtype=torch.float64), atol=1e-5)
    # the folded layer equals the round-1 layer projected onto the kept new eigen-directions
    name = "features.1.0"
    old, new = first.get_submodule(name), second.get_submodule(name)
    lam_a, q_a = torch.linalg.eigh(stats2.layers[name].A_channels.double())
    lam_s, q_s = torch.linalg.eigh(stats2.layers[name].S.double())
    r_in_old = old.rotate_in.weight[:, :, 0, 0].double()
    r_out_old = old.rotate_out.weight[:, :, 0, 0].double()
    # the kept directions are those whose basis vectors survive in the new rotations
    kept_a = (q_a.t() @ r_in_old @ new.rotate_in.weight[:, :, 0, 0].double().t()).abs().sum(1) > 0.5
    kept_s = (q_s.t() @ r_out_old.t() @ new.rotate_out.weight[:, :, 0, 0].double()).abs().sum(1) > 0.5
    assert kept_a.sum() == new.core.in_channels and kept_s.sum() == new.core.out_channels
    p_a = q_a[:, kept_a] @ q_a[:, kept_a].t()
    p_s = q_s[:, kept_s] @ q_s[:, kept_s].t()
    core = torch.einsum("os,sikl,ia->oakl", p_s, old.core.weight.double(), p_a)
    expected = torch.einsum("os,sikl,ia->oakl", r_out_old, core, r_in_old)
    assert torch.allclose(_effective(new), expected, atol=1e-5)


def _cp(v, u, d):
    return torch.einsum("or,ir,kr->oik", v, u, d)


@pytest.mark.parametrize("shape,rank", [((4, 5, 9), 3), ((6, 7, 4), 5), ((8, 8, 9), 6)])
def test_cp_decomposition_recovers_a_low_rank_tensor(shape, rank):
    import tensorly as tl
    g = torch.Generator().manual_seed(0)
    tensor = _cp(*(torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape))
    backend = tl.get_backend()
    factors = cp_decompose(tensor, rank)
    assert tl.get_backend() == backend  # the PyTorch backend was set for the call only
    assert [f.shape for f in factors] == [(n, rank) for n in shape]
    error = (_cp(*factors) - tensor).norm() / tensor.norm()
    assert error < 1e-6
    # deterministic (SVD initialisation, fixed seed for columns beyond a mode's size)
    assert all(torch.equal(a, b) for a, b in zip(factors, cp_decompose(tensor, rank)))


def test_cp_decomposition_of_a_zero_core_and_bad_rank():
    zero = torch.zeros(3, 2, 9)
    assert all(not f.any() for f in cp_decompose(zero, 4))
    with pytest.raises(EigenDamageError, match="--cp_rank"):
        cp_decompose(torch.ones(3, 2, 9), 0)


class TinyConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv2(F.relu(self.conv1(x))).mean((2, 3)))


def test_depthwise_core_matches_plain_bottleneck_at_full_rank():
    torch.manual_seed(4)
    model = TinyConvs().double()
    batches = [(x.double(), y) for x, y in _batches(shape=(2, 6, 6), classes=2)]
    stats = collect_eigen_statistics(model, batches, LOSS)
    plain = eigendamage_prune(model, stats, 0.0, allow_growth=True)
    dw = eigendamage_prune(model, stats, 0.0, allow_growth=True, depthwise=True, cp_rank=6)
    for name in ("conv1", "conv2"):
        core = dw.get_submodule(name).core
        assert core.groups == core.in_channels == core.out_channels == 6
        assert core.weight.shape == (6, 1, 3, 3)
    assert isinstance(dw.fc.core, nn.Linear)   # linear cores stay dense
    x = batches[0][0]
    assert torch.allclose(dw(x), plain(x), atol=1e-4)


def test_depthwise_network_computes_the_cp_reconstruction_of_its_cores():
    """Below full rank the depthwise core is an approximation: the network must compute exactly
    the plain bottleneck whose cores are replaced by their rank-r CP reconstructions."""
    torch.manual_seed(4)
    model = TinyConvs().double()
    batches = [(x.double(), y) for x, y in _batches(shape=(2, 6, 6), classes=2)]
    stats = collect_eigen_statistics(model, batches, LOSS)
    plain = eigendamage_prune(model, stats, 0.0, allow_growth=True)
    dw = eigendamage_prune(model, stats, 0.0, allow_growth=True, depthwise=True, cp_rank=2)
    errors = []
    for name in ("conv1", "conv2"):
        assert dw.get_submodule(name).core.weight.shape == (2, 1, 3, 3)
        core = plain.get_submodule(name).core
        flat = core.weight.detach().reshape(core.out_channels, core.in_channels, -1)
        approx = _cp(*cp_decompose(flat, 2))
        errors.append(float((approx - flat).norm() / flat.norm()))
        with torch.no_grad():
            core.weight.copy_(approx.reshape(core.weight.shape))
    assert max(errors) > 1e-3  # rank 2 really approximates here
    x = batches[0][0]
    assert torch.allclose(dw(x), plain(x), atol=1e-10)
    with pytest.raises(EigenDamageError, match="--cp_rank"):
        eigendamage_prune(model, stats, 0.0, depthwise=True, cp_rank=-1)


def test_cp_rank_flag_reaches_eigen_pruning():
    from pruners.registry import get_method
    from utils import cli
    p = cli.parser("test")
    cli.add_pruning(p)
    args = cli.parse(p, ["--importance_type", "Eigen", "--depthwise", "--cp_rank", "2"])
    eigen = get_method("Eigen")
    options = cli.method_options(args, eigen, eigen.options + eigen.prune_options)
    assert options["cp_rank"] == 2 and options["depthwise"] is True
    assert cli.parse(p, []).cp_rank is None  # default: max(kept inputs, kept outputs) per core
    torch.manual_seed(5)
    model = _randomise_bn(SmallVGG())
    example = torch.randn(1, 3, 8, 8)
    pruned, _ = eigen.prune_to_target(model, _batches(), LOSS, example, 0.6,
                                      classifier=model.classifier, **options)
    cores = [m.core for m in pruned.modules() if isinstance(m, EigenBottleneck) and m.depthwise]
    assert cores and all(c.out_channels == c.groups == 2 for c in cores)


def test_depthwise_used_only_where_it_saves_parameters():
    torch.manual_seed(5)
    model = _randomise_bn(SmallVGG())
    stats = collect_eigen_statistics(model, _batches(), LOSS)
    plain = eigendamage_prune(model, stats, 0.5)
    dw = eigendamage_prune(model, stats, 0.5, depthwise=True)

    def params(net, name):
        return sum(p.numel() for p in net.get_submodule(name).parameters())
    depthwise = [n for n, m in dw.named_modules() if isinstance(m, EigenBottleneck) and m.depthwise]
    assert depthwise
    for name in depthwise:
        assert params(dw, name) <= min(params(plain, name), params(model, name))
    assert count_params(dw) <= count_params(plain) < count_params(model)


def test_prune_to_macs_target_and_unreachable_target():
    torch.manual_seed(6)
    model = _randomise_bn(SmallResNet())
    batches = _batches()
    example = torch.randn(1, 3, 8, 8)
    pruned, info = prune_to_macs_target(model, batches, LOSS, example, 0.5, classifier=model.fc)
    full = count_macs(model, example)
    assert info["macs_before"] == full
    assert info["macs_after"] == count_macs(pruned, example) <= 0.5 * full
    assert info["params_after"] == count_params(pruned) < info["params_before"]
    assert set(info) >= {"prune_ratio", "seconds_estimating"}
    # one direction fewer would miss the target (the search is exact)
    stats = collect_eigen_statistics(model, batches, LOSS)
    n = info["removed_directions"]
    fewer = eigendamage_prune(model, stats, (n - 1) / info["total_directions"], classifier=model.fc)
    assert count_macs(fewer, example) > 0.5 * full
    with pytest.raises(EigenDamageError, match="max_pruning_ratio"):
        prune_to_macs_target(model, batches, LOSS, example, 0.001, max_pruning_ratio=0.5)
    # depthwise: the search counts shapes only; the final network gets its CP factors
    dw, info = prune_to_macs_target(model, batches, LOSS, example, 0.5, classifier=model.fc,
                                    depthwise=True)
    assert info["macs_after"] == count_macs(dw, example) <= 0.5 * full
    depthwise = [m for m in dw.modules() if isinstance(m, EigenBottleneck) and m.depthwise]
    assert depthwise and all(m.core.weight.abs().sum() > 0 for m in depthwise)


def test_eigen_parameter_scores_total_equals_theta():
    torch.manual_seed(7)
    model = _randomise_bn(SmallVGG()).double()
    batches = [(x.double(), y) for x, y in _batches()]
    scores = parameter_scores("Eigen", model, batches, fisher_type="empirical", score_mode="eval")
    model.eval()  # the same mode for the direct statistics
    stats = collect_eigen_statistics(model, batches, LOSS, fisher_type="empirical")
    for name in stats.layers:
        weight = model.get_submodule(name).weight
        assert scores[f"{name}.weight"].shape == weight.shape
        assert torch.allclose(scores[f"{name}.weight"].sum(), _theta(stats, name, weight).sum(), rtol=1e-8)


def test_vision_transformer_keeps_attention_projections():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(8)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                              mlp_dim=16, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)
    batches = _batches(shape=(3, 16, 16))
    stats = collect_eigen_statistics(model, batches, LOSS)
    assert not any("self_attention" in name for name in stats.layers)
    rebuilt = eigendamage_prune(model, stats, 0.0, allow_growth=True)
    assert isinstance(rebuilt.encoder.layers[0].mlp[0], EigenBottleneck)
    assert type(rebuilt.encoder.layers[0].self_attention.out_proj) is type(model.encoder.layers[0].self_attention.out_proj)
    x = batches[0][0]
    assert torch.allclose(rebuilt(x), model(x), atol=1e-5)

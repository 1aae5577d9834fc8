"""Every torchvision classification family is built by get_model, scored and pruned to a MACs
target by the structured driver, and still runs afterwards; layers torch-pruning cannot handle are
left alone and named. Grouped-convolution scores follow the groups (checked by hand)."""
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from torchvision.models import MaxVit, SwinTransformer, VisionTransformer
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

import models
from models import get_classifier, get_model
from pruners.driver import PruneSettings, prune_to_target
from pruners.group_scores import ScoreFolder
from utils.flops import count_macs

CLASSES = 5
TV_NAMES = torchvision.models.list_models(module=torchvision.models)


# ----------------------------------------------------------------------------- names

def test_every_torchvision_classification_model_is_available():
    names = set(models.available_models())
    for name in TV_NAMES:
        assert (f"tv_{name}" if name in ("vgg11", "vgg13", "vgg16", "vgg19") else name) in names
    assert isinstance(get_model("vgg16", 10), models.VGG)  # the CIFAR VGG keeps its name
    assert isinstance(get_model("tv_vgg16", 10), torchvision.models.VGG)
    assert isinstance(get_model("vgg16_bn", 10), torchvision.models.VGG)


def test_auxiliary_heads_off_and_conv_classifier():
    for name in ("googlenet", "inception_v3"):
        model = get_model(name, CLASSES).train()
        size = 75 if name == "inception_v3" else 32
        out = model(torch.randn(2, 3, size, size))
        assert isinstance(out, torch.Tensor) and out.shape == (2, CLASSES)
    squeeze = get_model("squeezenet1_0", CLASSES)
    assert isinstance(get_classifier(squeeze), nn.Conv2d) and get_classifier(squeeze).out_channels == CLASSES
    models.replace_classifier(squeeze, 3)
    assert squeeze.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_inception_file_with_auxiliary_heads_loads(tmp_path):
    source = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(source.state_dict(), tmp_path / "inception.pth")
    model = get_model("inception_v3", 1000, weights=str(tmp_path / "inception.pth"))
    assert model.AuxLogits is None
    assert torch.equal(model.fc.weight, source.fc.weight)


# ----------------------------------------------------------------------------- grouped scores

def test_grouped_conv_input_scores_follow_their_groups():
    """Input channel c = g * (in/groups) + j of a grouped conv is scored by column j of the rows
    of group g only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, groups=2))
    scores = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    folded = ScoreFolder(model, scores, normalizer="none")(group)
    out = (scores["0.weight"].sum((1, 2, 3)) + scores["0.bias"]).abs()
    w = scores["2.weight"]  # (6 outputs, 2 inputs per group, 3, 3); group 0 = rows 0-2
    by_hand = torch.stack([w[0:3, 0].sum(), w[0:3, 1].sum(), w[3:6, 0].sum(), w[3:6, 1].sum()]).abs()
    torch.testing.assert_close(folded, (out + by_hand) / 2)


def test_depthwise_conv_scored_by_its_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4))
    scores = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))
    folded = ScoreFolder(model, scores, normalizer="none")(group)
    first = (scores["0.weight"].sum((1, 2, 3)) + scores["0.bias"]).abs()
    depthwise = (scores["1.weight"].sum((1, 2, 3)) + scores["1.bias"]).abs()
    torch.testing.assert_close(folded, (first + depthwise) / 2)


# ----------------------------------------------------------------------------- pruning

def _tiny(name):
    """Small members of the heavy families, built from torchvision's own classes."""
    if name == "swin_t":
        return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=CLASSES), 32
    if name == "swin_v2_t":
        return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=CLASSES,
                               block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2), 32
    if name == "maxvit_t":
        return MaxVit((32, 32), 8, 2, [16, 32], [1, 1], 8, 0.0, num_classes=CLASSES), 32
    if name == "vit_b_16":
        return VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=CLASSES), 32
    return None


# Smallest inputs the architectures take (64 px elsewhere; MaxViT's grid needs 224).
SIZES = {"inception_v3": 75, "maxvit_t": 224}
# One small representative of every family (tiny configurations for the transformers).
FAST = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
        "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
        "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
        "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_16",
        "wide_resnet50_2"]


def _build(name, tiny):
    torch.manual_seed(0)
    built = _tiny(name) if tiny else None
    if built is not None:
        return built
    size = SIZES.get(name, 32 if name.startswith("vit_") else 64)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}  # fewer patches
    return get_model(name, CLASSES, **kwargs), size


def _prune_family(name, method, tiny=True, target=0.7):
    model, size = _build(name, tiny)
    head = get_classifier(model)
    if isinstance(head, nn.Linear):  # ViT / Swin heads start at zero: every score would be 0
        nn.init.normal_(head.weight, std=0.1)
    g = torch.Generator().manual_seed(0)

    def batches(n):
        return [(torch.randn(2, 3, size, size, generator=g), torch.randint(0, CLASSES, (2,), generator=g))
                for _ in range(n)]

    example = torch.randn(2, 3, size, size)
    dense = count_macs(model, example[:1])
    settings = PruneSettings(target_ops_ratio=target, iterative_steps=2, iters_per_step=1)
    report = prune_to_target(model, method, batches, nn.CrossEntropyLoss(), example, settings,
                             [get_classifier(model)], progress=False)
    macs = count_macs(model, example[:1])
    assert report.macs_after == macs <= target * dense
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, CLASSES)
    names = dict(model.named_modules())
    assert all(layer in names and why for layer, why in report.left_alone.items())
    return report


@pytest.mark.parametrize("name", FAST)
def test_family_pruned_to_target_with_oba(name, capsys):
    report = _prune_family(name, "OBA")
    err = capsys.readouterr().err
    for layer in report.left_alone:  # every layer left alone was named on stderr
        assert f"leaving layer {layer} alone" in err
    if name in ("shufflenet_v2_x0_5", "swin_t", "swin_v2_t", "maxvit_t"):
        assert report.left_alone  # channel shuffle / functional or head-split attention


@pytest.mark.slow
@pytest.mark.parametrize("method", ["OBA", "Weight", "Taylor", "Kron-OBD"])
@pytest.mark.parametrize("name", [n for n in models.available_models() if models.torchvision_models.is_torchvision_model(n)])
def test_every_torchvision_model_pruned(name, method):
    # 0.8: in Swin / MaxViT at small inputs only the MLP and conv widths are prunable (the hidden
    # width meets attention torch-pruning cannot follow), which does not reach 0.7 of the MACs.
    _prune_family(name, method, tiny=False, target=0.8)


# ----------------------------------------------------------------------------- MACs

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "regnet_x_400mf",
                                  "efficientnet_b0", "googlenet", "convnext_tiny", "swin_t", "maxvit_t"])
def test_macs_match_torchvision_published_ops(name):
    """torchvision's weights carry `_ops`: GFLOPS counted as multiply-accumulates at the weights'
    resolution; our counter must see the same conv, linear and attention products (Swin's
    functional attention, MaxViT's grid attention included). Counting only, no weights needed."""
    meta = torchvision.models.get_model_weights(name).DEFAULT.meta
    size = meta["min_size"][0] if name == "maxvit_t" else 224
    macs = count_macs(get_model(name, 1000), torch.randn(1, 3, size, size))
    assert macs / 1e9 == pytest.approx(meta["_ops"], rel=0.02)

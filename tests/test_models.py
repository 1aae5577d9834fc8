"""Model zoo: names, shapes, classifier lookup, weight loading and torch-pruning traceability."""
import os

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import models
from models import ModelError, get_classifier, get_model

CIFAR_MODELS = ["vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet44",
                "resnet56", "preresnet29"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _output_and_classifier_check(model, x, num_classes):
    """Right output shape, and the classifier is the final layer: zeroing its weight leaves
    exactly its bias as the output."""
    model.eval()
    head = get_classifier(model)
    assert isinstance(head, nn.Linear) and head.out_features == num_classes
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], num_classes)
        head.weight.zero_()
        head.bias.fill_(0.25)
        assert torch.equal(model(x), torch.full((x.shape[0], num_classes), 0.25))


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_model_output_shape_and_classifier(name):
    _output_and_classifier_check(get_model(name, 10), torch.randn(2, 3, 32, 32), 10)


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "preresnet29"])
def test_cifar_models_accept_other_resolutions(name):
    model = get_model(name, 200).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_resnet50_output_shape_and_classifier():
    _output_and_classifier_check(get_model("resnet50", 7), torch.randn(2, 3, 64, 64), 7)


def test_vit_b_16_output_shape_and_classifier():
    model = get_model("vit_b_16", 10)
    assert get_classifier(model) is model.heads.head
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_available_models_all_build():
    names = models.available_models()
    assert {"vgg19", "resnet32", "resnet56", "preresnet29", "resnet50", "vit_b_16"} <= set(names)


def test_resnet_widths():
    assert get_classifier(get_model("resnet20", 10)).in_features == 64
    assert get_classifier(get_model("resnet56", 10)).in_features == 64
    assert get_classifier(get_model("resnet32", 10)).in_features == 256  # 4x wide
    assert get_classifier(get_model("resnet44", 10)).in_features == 64  # general 6n+2 form
    assert get_classifier(get_model("resnet20", 10, width=8)).in_features == 32
    assert get_classifier(get_model("cifar_resnet50", 10)).in_features == 64
    # 1x1 conv + BN shortcut exactly where the shape changes
    net = get_model("resnet20", 10)
    assert net.layer1[0].shortcut is None
    assert isinstance(net.layer2[0].shortcut[0], nn.Conv2d)
    assert isinstance(net.layer2[0].shortcut[1], nn.BatchNorm2d)


def test_preresnet29_is_bottleneck_with_three_blocks_per_stage():
    net = get_model("preresnet29", 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [b.shortcut for stage in (net.layer1, net.layer2, net.layer3) for b in stage
                 if b.shortcut is not None]
    # stem + 9 bottlenecks x 3 convs + 2 projection shortcuts; depth counts 1 + 27 + fc = 29
    assert len(convs) == 1 + 27 + len(shortcuts) and len(shortcuts) == 2
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3)] == [3, 3, 3]


@pytest.mark.parametrize("name", ["foo", "vgg12", "resnet21", "preresnet30", "resnet"])
def test_unknown_model_name(name):
    with pytest.raises(ModelError) as info:
        get_model(name, 10)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert name in message and "vgg19" in message and "vit_b_16" in message


def test_bad_options_are_model_errors():
    with pytest.raises(ModelError, match="bad option"):
        get_model("vgg19", 10, depthwise=True)
    with pytest.raises(ModelError, match="bad option"):
        get_model("resnet50", 10, nonsense=1)
    with pytest.raises(ModelError, match="num_classes"):
        get_model("resnet20", 0)


def test_named_weights_not_cached_is_one_line_model_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelError) as info:
        get_model("resnet50", 10, weights="IMAGENET1K_V1")
    message = str(info.value)
    assert "\n" not in message and "not cached" in message
    assert os.path.join(str(tmp_path), "checkpoints", "resnet50-0676ba61.pth") in message
    assert "local" in message


def test_unknown_weights_name():
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):
        get_model("vit_b_16", 10, weights="IMAGENET2K")
    with pytest.raises(ModelError, match="do not belong"):
        get_model("resnet50", 10, weights="ViT_B_16_Weights.IMAGENET1K_V1")
    with pytest.raises(ModelError, match="local file"):
        get_model("resnet20", 10, weights="IMAGENET1K_V1")


def test_cached_named_weights_load_and_head_is_replaced(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    source = get_model("resnet50", 1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "resnet50-0676ba61.pth")
    model = get_model("resnet50", 10, weights="ResNet50_Weights.IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[2].bn3.running_var, source.layer4[2].bn3.running_var)
    assert model.fc.out_features == 10


def _assert_same_weights(a, b, skip_prefix=None):
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if skip_prefix is None or not key.startswith(skip_prefix):
            assert torch.equal(x, y), key


def test_local_state_dict_file(tmp_path):
    source = get_model("resnet20", 10)
    source.layer1[0].bn1.running_mean.uniform_()
    path = str(tmp_path / "dense.pth")
    torch.save(source.state_dict(), path)
    _assert_same_weights(get_model("resnet20", 10, weights=path), source)


def test_local_checkpoint_dicts(tmp_path):
    source = get_model("vgg11", 10)
    wrapped = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "ckpt.pth")
    _assert_same_weights(get_model("vgg11", 10, weights=str(tmp_path / "ckpt.pth")), source)
    # a pickled module is never unpickled (loading would run code from the file): one line
    torch.save({"model": source, "acc": 0.5}, tmp_path / "whole.pth")
    with pytest.raises(ModelError, match="convert it once"):
        get_model("vgg11", 10, weights=str(tmp_path / "whole.pth"))


def test_local_file_with_other_head_keeps_fresh_classifier(tmp_path):
    source = get_model("resnet20", 100)
    torch.save(source.state_dict(), tmp_path / "c100.pth")
    model = get_model("resnet20", 10, weights=str(tmp_path / "c100.pth"))
    assert model.fc.out_features == 10
    _assert_same_weights(model, source, skip_prefix="fc.")


def test_local_file_of_other_network_is_an_error(tmp_path):
    torch.save(get_model("resnet20", 10).state_dict(), tmp_path / "r20.pth")
    with pytest.raises(ModelError, match="does not fit"):
        get_model("resnet44", 10, weights=str(tmp_path / "r20.pth"))
    with pytest.raises(ModelError, match="does not exist"):
        get_model("resnet20", 10, weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name,kwargs", [("vgg11", {}), ("resnet20", {"width": 8}),
                                         ("preresnet29", {"width": 8})])
def test_torch_pruning_traces_and_prunes(name, kwargs):
    model = get_model(name, 10, **kwargs).eval()
    example = torch.randn(1, 3, 32, 32)
    head = get_classifier(model)
    before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[head])
    pruner.step()
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.5 * before
    assert head.out_features == 10
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_shortcut_couples_block_outputs():
    model = get_model("resnet20", 10, width=4).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    block = model.layer2[0]
    group = graph.get_pruning_group(block.conv2, tp.prune_conv_out_channels, idxs=[0])
    coupled = {dep.target.module for dep, _ in group}
    assert block.shortcut[0] in coupled and model.layer2[1].conv2 in coupled

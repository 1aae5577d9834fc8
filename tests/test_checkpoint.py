"""Safe loading: pruned models are rebuilt from structure + state_dict (weights_only=True), files
that would run code are refused with one line and nothing executed, older files are converted."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from models import ModelError, get_model
from models.attention import SplitAttention, convert_attention, refresh_width_attributes
from pruners.driver import PruneSettings, prune_to_target
from pruners.eigendamage import EigenBottleneck, collect_eigen_statistics, eigendamage_prune
from utils.checkpoint import (CheckpointError, convert, load_checkpoint, load_pruned_model,
                              save_atomic, save_pruned_model)

REPO = Path(__file__).resolve().parent.parent
LOSS = nn.CrossEntropyLoss()


def _batches(n, shape=(3, 32, 32), classes=10, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _prune(model, target, head, **kw):
    settings = PruneSettings(target_ops_ratio=target, iterative_steps=2, iters_per_step=1, **kw)
    prune_to_target(model, "Weight", _batches, LOSS, torch.randn(2, 3, 32, 32), settings, [head],
                    progress=False)
    return model


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def assert_round_trip(model, path, x, **meta):
    """Same outputs in eval and train mode, same structure, and the copy still trains."""
    save_pruned_model(model, path, **meta)
    loaded = load_pruned_model(path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    model.eval()
    assert torch.equal(loaded(x), model(x))
    model.train()
    loaded.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = loaded(x)
    assert torch.equal(a, b)
    # Trainable: one SGD step changes the weights.
    opt = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().clone() for p in loaded.parameters() if p.requires_grad]
    F.cross_entropy(b, torch.zeros(len(b), dtype=torch.long)).backward()
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(before, (p for p in loaded.parameters()
                                                              if p.requires_grad)))
    return loaded


def test_channel_pruned_cifar_resnet(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(get_model("resnet20", 10))
    _prune(model, 0.5, model.linear if hasattr(model, "linear") else model.fc)
    dense = get_model("resnet20", 10)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    loaded = assert_round_trip(model, tmp_path / "p.pth", torch.randn(2, 3, 32, 32),
                               arch="resnet20", num_classes=10, note="x")
    conv = next(m for m in loaded.modules() if isinstance(m, nn.Conv2d))
    assert conv.out_channels == conv.weight.shape[0]  # int attributes follow the tensors
    assert load_pruned_model(tmp_path / "p.pth", with_meta=True)[1]["note"] == "x"


def tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                 num_heads=4, hidden_dim=32, mlp_dim=64,
                                                 num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


@pytest.mark.parametrize("heads", [False, True])
def test_pruned_tiny_vit(tmp_path, heads):
    model = tiny_vit()
    _prune(model, 0.3, model.heads.head, prune_heads=heads)
    attentions = [m for m in model.modules() if isinstance(m, SplitAttention)]
    assert attentions and model.hidden_dim < 32
    if heads:  # whole heads out too (what --prune_heads does), on top of the width pruning
        for a in attentions:
            a.remove_heads([0, 2])
        refresh_width_attributes(model)
        assert model.encoder.layers[0].num_heads == 2
    model.encoder.dropout.p = 0.1  # train mode must match too: dropout draws from the RNG
    loaded = assert_round_trip(model, tmp_path / "vit.pth", torch.randn(2, 3, 32, 32),
                               arch="vit_tiny", num_classes=10)  # not a get_model name: no skeleton
    for a, b in zip(loaded.modules(), model.modules()):
        if isinstance(a, SplitAttention):
            assert (a.num_heads, a.qk_dim, a.v_dim, a.scale) == (b.num_heads, b.qk_dim, b.v_dim, b.scale)
    assert loaded.hidden_dim == model.hidden_dim


def test_get_model_vit_with_removed_heads_and_hidden_dims(tmp_path):
    """vit_b_16 through get_model (the loader starts from its skeleton): heads removed, hidden
    width (LayerNorm normalized_shape, hidden_dim) cut by torch-pruning-like surgery."""
    torch.manual_seed(0)
    model = convert_attention(get_model("vit_b_16", 10, image_size=32))
    for block in model.encoder.layers:
        block.self_attention.remove_heads(list(range(1, 12)))
    refresh_width_attributes(model)
    assert model.encoder.layers[0].num_heads == 1
    x = torch.randn(1, 3, 32, 32)
    loaded = assert_round_trip(model.eval(), tmp_path / "vit_b.pth", x, arch="vit_b_16",
                               num_classes=10, model_kwargs={"image_size": 32})
    assert loaded.encoder.layers[0].num_heads == 1 and loaded.image_size == 32


def test_eigendamage_bottlenecks_with_depthwise_cores(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(get_model("resnet8", 10)).eval()
    stats = collect_eigen_statistics(model, _batches(2), LOSS)
    pruned = eigendamage_prune(model, stats, 0.3, allow_growth=True, depthwise=True, cp_rank=4)
    bottlenecks = [m for m in pruned.modules() if isinstance(m, EigenBottleneck)]
    assert bottlenecks and any(b.depthwise for b in bottlenecks)
    loaded = assert_round_trip(pruned, tmp_path / "eig.pth", torch.randn(2, 3, 32, 32),
                               arch="resnet8", num_classes=10)
    frozen = [m.rotate_in.weight.requires_grad for m in loaded.modules() if isinstance(m, EigenBottleneck)]
    assert frozen and not any(frozen)


def test_depthwise_conv_whose_groups_changed(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 16, 2))
    # Keep 5 of the depthwise conv's 8 channels, as torch-pruning does.
    keep = torch.tensor([0, 2, 3, 5, 7])
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.weight = nn.Parameter(layer.weight[keep].clone())
            layer.bias = nn.Parameter(layer.bias[keep].clone())
            layer.out_channels = 5
        model[3].in_channels = model[3].groups = 5
        bn = model[1]
        bn.weight, bn.bias = nn.Parameter(bn.weight[keep].clone()), nn.Parameter(bn.bias[keep].clone())
        bn.running_mean, bn.running_var = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
        bn.num_features = 5
        cols = torch.arange(8 * 16).reshape(8, 16)[keep].flatten()
        model[5].weight = nn.Parameter(model[5].weight[:, cols].clone())
        model[5].in_features = 5 * 16
    loaded = assert_round_trip(model, tmp_path / "dw.pth", torch.randn(2, 3, 4, 4))
    assert loaded[3].groups == 5 and loaded[1].num_features == 5


# ----------------------------------------------------------------------------- refusals

MARKER = "pwned.marker"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path):
    marker = tmp_path / MARKER
    zipped = tmp_path / "evil.pth"
    torch.save({"format": "hessian-pruning/1", "kind": "pruned_model", "state_dict": Evil(marker)},
               zipped)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"state_dict": Evil(marker)}))
    return marker, (zipped, raw)


def test_malicious_files_are_refused_and_never_run(tmp_path):
    marker, files = _evil_files(tmp_path)
    for path in files:
        for load in (load_pruned_model, load_checkpoint):
            with pytest.raises(CheckpointError) as err:
                load(path)
            msg = str(err.value)
            assert "\n" not in msg and "refused" in msg and "system" in msg, msg
        with pytest.raises(ModelError) as err:
            get_model("resnet8", 10, weights=str(path))
        assert "\n" not in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()


def test_malicious_weights_file_in_a_script_is_one_line(tmp_path):
    marker, (zipped, _) = _evil_files(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "train_prune.py"), "--model", "resnet8",
                           "--weights", str(zipped), "--num_epochs", "0", "--no-progress",
                           "--output_dir", str(tmp_path / "out"), "--save_path_prefix",
                           str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "refused" in err, err
    assert not marker.exists()


def _old_format(model, path, **meta):
    """A file as the previous version wrote it: the whole module pickled."""
    torch.save({"format": "hessian-pruning/1", "kind": "pruned_model", "model": model, "meta": meta},
               path)


def test_old_format_gets_the_conversion_message_and_converts(tmp_path):
    torch.manual_seed(0)
    model = _randomise_bn(get_model("resnet8", 10))
    _prune(model, 0.6, model.linear if hasattr(model, "linear") else model.fc)
    model.eval()
    old, new = tmp_path / "old.pth", tmp_path / "new.pth"
    _old_format(model, old, arch="resnet8", num_classes=10, results={"acc": 1.0})
    with pytest.raises(CheckpointError) as err:
        load_pruned_model(old)
    msg = str(err.value)
    assert "\n" not in msg and "python -m utils.checkpoint convert" in msg and "older" in msg, msg
    proc = subprocess.run([sys.executable, "-m", "utils.checkpoint", "convert", str(old), str(new)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded, meta = load_pruned_model(new, with_meta=True)
    assert meta["results"] == {"acc": 1.0}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    # not a file of ours: one line, exit 2, nothing written
    proc = subprocess.run([sys.executable, "-m", "utils.checkpoint", "convert", str(tmp_path / "no"),
                           str(tmp_path / "x.pth")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x.pth").exists()


def test_old_training_checkpoint_with_numpy_rng_still_loads_and_converts(tmp_path):
    import numpy as np
    np.random.seed(3)
    state = {"format": "hessian-pruning/1", "kind": "training", "epoch": 1,
             "state_dict": nn.Linear(2, 2).state_dict(), "rng": {"numpy": np.random.get_state()}}
    save_atomic(state, tmp_path / "old.train.pth")
    ckpt = load_checkpoint(tmp_path / "old.train.pth")  # ndarray RNG key: plain data, loads
    assert np.array_equal(ckpt["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert convert(tmp_path / "old.train.pth", tmp_path / "new.train.pth") == "checkpoint"
    key = load_checkpoint(tmp_path / "new.train.pth")["rng"]["numpy"][1]
    assert isinstance(key, torch.Tensor) and np.array_equal(key.numpy(), state["rng"]["numpy"][1])


def test_class_outside_the_allow_list_is_refused(tmp_path):
    class Local(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(CheckpointError, match="outside the packages"):
        save_pruned_model(nn.Sequential(Local()), tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
    # A file naming a class outside the allow-list (hand-edited) is refused by name only.
    save_pruned_model(nn.Sequential(nn.ReLU()), tmp_path / "ok.pth")
    obj = torch.load(tmp_path / "ok.pth", weights_only=True)
    for name in ("subprocess:Popen", "models:os.system", "torch.nn:Module.__subclasses__"):
        obj["structure"]["0"]["class"] = name
        torch.save(obj, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError) as err:
            load_pruned_model(tmp_path / "bad.pth")
        assert "\n" not in str(err.value) and name in str(err.value)

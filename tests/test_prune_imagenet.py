"""prune_imagenet.py on tiny ImageNet-format folders: pretrained weights in, pruned network and
record out, never any training; its bad input is one line."""
import json

import pytest
import torch
import torchvision

from helpers import assert_one_line_error, run_script
from models import get_model
from utils.checkpoint import load_pruned_model

FAST = ["--image_size", "32", "--iterative_steps", "2", "--iters_per_step", "2", "--batch_size", "6",
        "--bn_recalibration_batches", "2", "--device", "cpu", "--no-progress"]


def run(*args):
    return run_script("prune_imagenet.py", *args)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Local 'pretrained' files for 3 classes. The ResNet gets BatchNorm statistics that match
    its activations (at initialisation they do not, and eval-mode criteria then see activations
    growing without bound through 50 layers); the ViT's zero-initialised head gets random weights,
    as training would give it (an all-zero head gives every channel a zero score)."""
    from utils.engine import recalibrate_batchnorm
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    resnet = get_model("resnet50", 3)
    recalibrate_batchnorm(resnet, [(torch.randn(8, 3, 32, 32), None)] * 2, "cpu")
    vit = get_model("vit_b_16", 3, image_size=32)
    torch.nn.init.normal_(vit.heads.head.weight, std=0.05)
    torch.save(resnet.state_dict(), folder / "resnet50.pth")
    torch.save({"model": vit.state_dict()}, folder / "vit.pth")
    return folder


@pytest.mark.parametrize("model,file,criterion,target", [
    # the empirical Fisher: on a random network the predictive distribution of the true Fisher
    # can be so peaked that sampled labels give exactly zero gradients
    ("resnet50", "resnet50.pth", ["Kron-OBD", "--fisher_type", "empirical"], 0.6),
    ("vit_b_16", "vit.pth", ["OBA"], 0.7),
])
def test_prune_pretrained_network(tmp_path, imagenet_folder, weights, model, file, criterion,
                                  target):
    out = tmp_path / "out"
    proc = run("--model", model, "--weights", weights / file, "--data_root", imagenet_folder,
               "--importance_type", *criterion, "--ops_ratios", target, "--save_dir", out, *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "pruned_model.json").read_text())
    assert record["achieved_ops_ratio"] <= target and record["flops_unit"] == "MACs"
    for key in ("test_acc_dense", "test_top5_dense", "test_acc_pruned", "test_top5_pruned"):
        assert 0.0 <= record[key] <= 100.0, key
    assert "dense training" not in proc.stderr  # pretrained weights are never re-trained
    # the printed command fine-tunes exactly this file
    assert f"train_imagenet.py --save_dir {out} --model_name pruned_model" in proc.stdout
    assert record["finetune_command"].startswith("torchrun --nproc_per_node 8 ")
    net, meta = load_pruned_model(out / "pruned_model.pth", with_meta=True)
    assert meta["arch"] == model and meta["num_classes"] == 3 and meta["image_size"] == 32
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    if model == "vit_b_16":
        # still a torchvision VisionTransformer, its width attributes matching its tensors
        assert isinstance(net, torchvision.models.VisionTransformer)
        hidden = net.class_token.shape[-1]
        assert net.hidden_dim == hidden
        widths = [(b.mlp[0].out_features, b.self_attention.q_proj.out_features,
                   b.self_attention.v_proj.out_features) for b in net.encoder.layers]
        assert hidden < 768 or any(w != (3072, 768, 768) for w in widths)
        assert net.heads.head.in_features == hidden and net.conv_proj.out_channels == hidden
        for block in net.encoder.layers:
            assert block.ln_1.normalized_shape == (hidden,)
            assert block.num_heads == block.self_attention.num_heads


def test_several_targets_each_from_the_dense_network(tmp_path, imagenet_folder, weights):
    out = tmp_path / "out"
    proc = run("--model", "resnet50", "--weights", weights / "resnet50.pth", "--data_root",
               imagenet_folder, "--importance_type", "Weight", "--ops_ratios", "0.8", "0.5",
               "--save_dir", out, "--no-eval", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "pruned_model_ops0.8.json").read_text())
    second = json.loads((out / "pruned_model_ops0.5.json").read_text())
    assert first["achieved_ops_ratio"] <= 0.8 and second["achieved_ops_ratio"] <= 0.5
    assert first["dense_macs"] == second["dense_macs"]
    assert "test_acc_pruned" not in first  # --no-eval
    summary = json.loads((out / "pruned_model_summary.json").read_text())
    assert [r["target_ops_ratio"] for r in summary] == [0.8, 0.5]


def test_weights_not_cached_say_where(tmp_path, imagenet_folder, monkeypatch):
    env_home = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(env_home))
    proc = run("--model", "resnet50", "--data_root", imagenet_folder, "--save_dir", tmp_path / "o",
               *FAST)
    assert_one_line_error(proc, "not cached", str(env_home))
    assert not (tmp_path / "o" / "pruned_model.pth").exists()


def test_missing_val_folder(tmp_path, weights):
    (tmp_path / "data" / "train" / "n01").mkdir(parents=True)
    proc = run("--model", "resnet50", "--weights", weights / "resnet50.pth", "--data_root",
               tmp_path / "data", "--save_dir", tmp_path / "o", *FAST)
    assert_one_line_error(proc, "validation folder", "val")


def test_weights_of_another_architecture(tmp_path, imagenet_folder, weights):
    proc = run("--model", "resnet50", "--weights", weights / "vit.pth", "--data_root",
               imagenet_folder, "--save_dir", tmp_path / "o", *FAST)
    assert_one_line_error(proc, "does not fit")


def test_existing_result_is_not_overwritten_by_a_failing_run(tmp_path, imagenet_folder, weights):
    out = tmp_path / "o"
    out.mkdir()
    (out / "pruned_model.pth").write_bytes(b"earlier result")
    proc = run("--model", "resnet50", "--weights", weights / "vit.pth", "--data_root",
               imagenet_folder, "--save_dir", out, *FAST)
    assert proc.returncode != 0
    assert (out / "pruned_model.pth").read_bytes() == b"earlier result"


def test_pretrained_only(tmp_path, imagenet_folder):
    proc = run("--model", "resnet50", "--weights", "none", "--data_root", imagenet_folder,
               "--save_dir", tmp_path / "o", *FAST)
    assert_one_line_error(proc, "--weights")

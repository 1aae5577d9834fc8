"""train_imagenet.py on CPU on a tiny ImageNet-format folder: single process, torchrun with two
processes (gloo), interrupted-and-resumed runs, and bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, run_script, write_imagenet_folder

FAST = ["--image_size", "32", "--workers", "0", "--device", "cpu", "--no-progress",
        "--no-tensorboard", "--lr", "0.01"]
# Recipe options whose state must survive an interruption (optimiser moments, warm-up + cosine
# schedule position, EMA, the RNG of MixUp/CutMix).
RICH = ["--opt", "adamw", "--lr-scheduler", "cosineannealinglr", "--lr-warmup-epochs", "1",
        "--label-smoothing", "0.1", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
        "--model-ema", "--model-ema-steps", "2", "--clip-grad-norm", "1", "--auto-augment", "ra"]
METRICS = ("train_loss", "train_acc", "lr", "test_loss", "test_top1", "test_top5")


def run(*args, procs=1):
    return run_script("train_imagenet.py", *args, procs=procs, env={"OMP_NUM_THREADS": "1"},
                      timeout=600)


def history(save_dir, name="pruned_model"):
    rec = json.loads((Path(save_dir) / f"{name}_finetuned.json").read_text())
    return rec, [{k: h[k] for k in METRICS if k in h} for h in rec["history"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3 classes x 8 training + 4 val images of 40x40 px, and a tiny ViT saved as a pruned model
    (no BatchNorm: see test_two_processes_match_one)."""
    from torchvision.models.vision_transformer import VisionTransformer

    from utils.checkpoint import save_pruned_model

    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet_folder(root / "data", size=(40, 40))
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                            mlp_dim=32, num_classes=3)
    save_pruned_model(vit, root / "model" / "pruned_model.pth", arch="vit_tiny",
                      dataset="imagenet", image_size=32, num_classes=3)
    return root


def fresh(world, tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(world / "model" / "pruned_model.pth", d)
    return d


@pytest.fixture(scope="module")
def single(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    shutil.copy(world / "model" / "pruned_model.pth", d)
    proc = run("--save_dir", str(d), "--data_root", str(world / "data"), *FAST, "-b", "4",
               "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def test_single_process_fine_tunes_and_saves(single, world):
    from utils.checkpoint import load_pruned_model

    rec, hist = history(single)
    assert rec["world_size"] == 1 and rec["global_batch_size"] == 4 and rec["test_images"] == 12
    assert len(hist) == 1 and set(METRICS) <= set(hist[0])
    model, meta = load_pruned_model(single / "pruned_model_finetuned.pth", with_meta=True)
    assert meta["image_size"] == 32 and meta["arch"] == "vit_tiny"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert (single / "pruned_model_newest.pth").exists()


def test_two_processes_match_one(single, world, tmp_path):
    """torchrun, 2 processes x batch 2 vs 1 process x batch 4. The global batches are the same
    images with the same augmentation (one sampler permutation split by rank; every image's
    augmentation is seeded by (seed, epoch, index), not by the process). The model has no
    BatchNorm and no dropout, so the DDP gradient (mean over ranks of per-rank means of equal
    size) is the global-batch gradient: the runs differ only by floating-point summation order,
    hence the tight relative tolerance. Evaluation shards the val set without padding and
    all-reduces sums, so every image counts exactly once."""
    d = fresh(world, tmp_path, "ddp")
    proc = run("--save_dir", str(d), "--data_root", str(world / "data"), *FAST, "-b", "2",
               "--epochs", "1", procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec2, h2 = history(d)
    rec1, h1 = history(single)
    assert rec2["world_size"] == 2 and rec2["global_batch_size"] == 4 and rec2["test_images"] == 12
    for a, b in zip(h1, h2):
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), k
    assert proc.stdout.count("fine-tuned") == 1  # rank 0 alone reports


def test_interrupted_and_resumed_equals_uninterrupted(world, tmp_path):
    common = ["--data_root", str(world / "data"), *FAST, *RICH, "-b", "4", "--epochs", "2"]
    full = fresh(world, tmp_path, "full")
    proc = run("--save_dir", str(full), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    part = fresh(world, tmp_path, "part")
    proc = run("--save_dir", str(part), *common, "--stop_after_epochs", "1")
    assert proc.returncode == 0 and "--resume" in proc.stdout, proc.stderr[-3000:]
    assert not (part / "pruned_model_finetuned.pth").exists()
    proc = run("--save_dir", str(part), *common, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec_full, h_full = history(full)
    rec_part, h_part = history(part)
    assert h_full == h_part
    assert rec_full["final_weights"] == "ema"
    assert (rec_full["test_loss"], rec_full["test_top1"]) == (rec_part["test_loss"], rec_part["test_top1"])
    a = torch.load(full / "pruned_model_finetuned.pth", weights_only=True)["state_dict"]
    b = torch.load(part / "pruned_model_finetuned.pth", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_input_is_one_line_and_touches_nothing(world, single, tmp_path):
    data = world / "data"
    # a missing val folder
    broken = tmp_path / "broken"
    shutil.copytree(data / "train", broken / "train")
    d = fresh(world, tmp_path, "bad")
    proc = run("--save_dir", str(d), "--data_root", str(broken), *FAST)
    assert_one_line_error(proc, "val")
    # a --model_name whose file does not exist
    proc = run("--save_dir", str(d), "--model_name", "nope", "--data_root", str(data), *FAST)
    assert_one_line_error(proc, "nope.pth")
    # resuming from a checkpoint of another architecture
    torch.manual_seed(0)
    import torchvision

    from utils.checkpoint import save_pruned_model
    save_pruned_model(torchvision.models.resnet18(num_classes=3), d / "pruned_model.pth",
                      model="resnet18")
    newest = d / "pruned_model_newest.pth"
    shutil.copy(single / "pruned_model_newest.pth", newest)
    before = newest.read_bytes()
    proc = run("--save_dir", str(d), "--data_root", str(data), *FAST, "--resume")
    assert_one_line_error(proc, "vit_tiny")
    assert newest.read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["pruned_model.pth", "pruned_model_newest.pth"]
    # mixed precision asked for on a CPU (in-process: the same error boundary, less start-up)
    import train_imagenet
    from utils.cli import UsageError
    with pytest.raises(ValueError, match="--amp"):
        train_imagenet.main(["--save_dir", str(d), "--data_root", str(data), *FAST, "--amp"])


def test_test_only_reports_the_saved_metrics(single, world):
    rec, _ = history(single)
    proc = run("--save_dir", str(single), "--model_name", "pruned_model_finetuned", "--test-only",
               "--data_root", str(world / "data"), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"top-1 {rec['test_top1']:.2f}%" in proc.stdout and "(12 images)" in proc.stdout
    assert not (single / "pruned_model_finetuned_newest.pth").exists()  # evaluation writes nothing


def test_shards_are_disjoint_and_rebuild_the_global_batches(world):
    """In-process check of utils.data.shard_loaders: the val shards cover every image once, and
    the two ranks' training batches (augmentation included) are the single process's global
    batches, split by rank."""
    from utils.data import build_loaders, shard_loaders

    base = build_loaders("imagenet", data_root=world / "data", batch_size=2, val_fraction=0.0,
                         image_size=32, auto_augment="ta_wide")
    ranks = [shard_loaders(base, seed=3, rank=r, world=2) for r in (0, 1)]
    val = [list(ld.test.sampler) for ld in ranks]
    assert sorted(val[0] + val[1]) == list(range(12)) and not set(val[0]) & set(val[1])
    one = shard_loaders(build_loaders("imagenet", data_root=world / "data", batch_size=4,
                                      val_fraction=0.0, image_size=32, auto_augment="ta_wide"),
                        seed=3, rank=0, world=1)
    for ld in ranks + [one]:
        ld.train.sampler.set_epoch(1)
    torch.manual_seed(0)
    for (x0, y0), (x1, y1), (x, y) in zip(ranks[0].train, ranks[1].train, one.train):
        # DistributedSampler deals the permutation round-robin: rank r holds items r, r + 2, ...
        torch.testing.assert_close(torch.stack([x0[0], x1[0], x0[1], x1[1]]), x)
        assert torch.equal(torch.stack([y0[0], y1[0], y0[1], y1[1]]), y)

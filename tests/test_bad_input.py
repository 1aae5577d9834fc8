"""Bad input to every script: out-of-range counts, --val_fraction outside [0, 1), --resume with
nothing to resume, empty class folders and unreadable images. Each is one line on stderr naming
the problem and the fix, exit 2, no traceback, and files already on disk unchanged.

The scripts run in this process through their real error boundary (`cli.run_main`), which is
what `python script.py` runs too; test_scripts.py covers the subprocess path."""
import importlib.util
import json
import signal
from pathlib import Path

import pytest
import torch

from helpers import write_imagenet_folder
from utils.data import DataError, build_loaders

REPO = Path(__file__).resolve().parent.parent
DIGITS = ["--model", "resnet8", "--no-progress", "--no-tensorboard", "--device", "cpu"]


def script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_sigterm():
    before = signal.getsignal(signal.SIGTERM)  # run_main installs its own handler
    yield
    signal.signal(signal.SIGTERM, before)


def run_script(name, argv, capsys):
    from utils import cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(script(name).main, [str(a) for a in argv])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def assert_usage_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


@pytest.fixture
def disk(tmp_path):
    """An output folder and a checkpoint folder holding a file each, to check nothing changes."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous results")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("previous checkpoint")
    return tmp_path


def where(disk):
    return ["--output_dir", disk / "out", "--save_path_prefix", disk / "ckpt"]


CASES = [  # (script, flags, words the message must hold)
    ("train_prune.py", ["--num_epochs", "-1"], ["--num_epochs", "at least 0"]),
    ("train_prune.py", ["--sl_num_epochs", "-2"], ["--sl_num_epochs", "at least 0"]),
    ("train_prune.py", ["--batch_size", "0"], ["--batch_size", "at least 1"]),
    ("train_prune.py", ["--eval_batch_size", "0"], ["--eval_batch_size", "at least 1"]),
    ("train_prune.py", ["--iterative_steps", "0"], ["--iterative_steps", "at least 1"]),
    ("train_prune.py", ["--iters_per_step", "-1"], ["--iters_per_step", "at least 1"]),
    ("train_prune.py", ["--num_workers", "-1"], ["--num_workers", "at least 0"]),
    ("train_prune.py", ["--bn_recalibration_batches", "-1"], ["--bn_recalibration_batches"]),
    ("train_prune.py", ["--val_fraction", "1"], ["--val_fraction", "[0, 1)", "0 for no"]),
    ("train_prune.py", ["--val_fraction", "1.5"], ["--val_fraction", "[0, 1)"]),
    ("train_prune.py", ["--val_fraction", "-0.1"], ["--val_fraction", "[0, 1)"]),
    ("train_prune.py", ["--val_fraction", "nan"], ["--val_fraction", "[0, 1)"]),
    ("iterative_prune.py", ["--num_epochs", "-5"], ["--num_epochs"]),
    ("iterative_prune.py", ["--batch_size", "-3"], ["--batch_size"]),
    ("iterative_prune.py", ["--iters_per_step", "0"], ["--iters_per_step"]),
    ("iterative_prune.py", ["--val_fraction", "1"], ["--val_fraction"]),
    ("train_unstructured_prune.py", ["--sl_num_epochs", "-1"], ["--sl_num_epochs"]),
    ("train_unstructured_prune.py", ["--batch_size", "0"], ["--batch_size"]),
    ("train_unstructured_prune.py", ["--iterative_steps", "0"], ["--iterative_steps"]),
    ("train_unstructured_prune.py", ["--ft_between_steps", "-1"], ["--ft_between_steps"]),
    ("prune_imagenet.py", ["--importance_batch_size", "0"], ["--importance_batch_size"]),
    ("prune_imagenet.py", ["--iterative_steps", "0"], ["--iterative_steps"]),
    ("prune_imagenet.py", ["--iters_per_step", "0"], ["--iters_per_step"]),
    ("prune_imagenet.py", ["--batch_size", "0"], ["--batch_size"]),
    ("prune_imagenet.py", ["--val_fraction", "1"], ["--val_fraction"]),
    ("train_imagenet.py", ["--epochs", "-1"], ["--epochs", "at least 0"]),
    ("train_imagenet.py", ["-b", "0"], ["--batch-size", "at least 1"]),
    ("train_imagenet.py", ["--workers", "-1"], ["--workers"]),
    ("train_imagenet.py", ["--stop_after_epochs", "0"], ["--stop_after_epochs"]),
]


def script_args(name, disk):
    if name == "train_imagenet.py":
        return ["--save_dir", disk / "out", "--device", "cpu", "--no-progress"]
    if name == "prune_imagenet.py":
        return ["--save_dir", disk / "out", "--weights", disk / "ckpt" / "keep.txt",
                "--device", "cpu", "--no-progress"]
    return DIGITS + where(disk)


@pytest.mark.parametrize("name,flags,words", CASES,
                         ids=[f"{n[:-3]}{''.join(f)}" for n, f, _ in CASES])
def test_out_of_range_counts_are_one_line(name, flags, words, disk, capsys):
    before = snapshot(disk)
    code, _, err = run_script(name, script_args(name, disk) + flags, capsys)
    assert_usage_error(code, err, *words)
    assert snapshot(disk) == before


@pytest.mark.parametrize("name", ["train_prune.py", "iterative_prune.py",
                                  "train_unstructured_prune.py", "prune_imagenet.py",
                                  "train_imagenet.py"])
def test_resume_with_nothing_to_resume(name, disk, imagenet_folder, capsys):
    before = snapshot(disk)
    extra = {"train_unstructured_prune.py": ["--pruning_ratio", "0.5"],
             "train_imagenet.py": ["--model", "resnet20", "--data_root", imagenet_folder,
                                   "--image_size", "32", "--workers", "0"]}.get(name, [])
    code, _, err = run_script(name, script_args(name, disk) + extra + ["--resume"], capsys)
    assert_usage_error(code, err, "nothing to resume", "without --resume")
    assert snapshot(disk) == before
    assert not (disk / "out" / "tb").exists()


# ----------------------------------------------------------------------------- data

def test_empty_class_folder(tmp_path, capsys):
    root = write_imagenet_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    (root / "train" / "n04").mkdir()
    with pytest.raises(DataError, match="n04 holds no images"):
        build_loaders("imagenet", data_root=root, batch_size=2)
    before = snapshot(tmp_path)
    code, _, err = run_script("train_imagenet.py", [
        "--save_dir", tmp_path / "out", "--model", "resnet20", "--data_root", root,
        "--image_size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu",
        "--no-progress", "--no-tensorboard"], capsys)
    assert_usage_error(code, err, str(root / "train" / "n04"), "remove the folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_named_when_read(tmp_path, workers):
    root = write_imagenet_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    bad = root / "train" / "n02" / "n02_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    loaders = build_loaders("imagenet", data_root=root, batch_size=2, num_workers=workers,
                            image_size=32, val_fraction=0)
    with pytest.raises(DataError) as err:
        for _ in loaders.train:
            pass
    message = str(err.value)
    assert str(bad) in message and "replace or delete the file" in message
    assert "Traceback" not in message and "\n" not in message
    assert bad.read_bytes() == b"\xff\xd8\xff not really a jpeg"


def test_corrupt_image_stops_a_script_with_one_line(tmp_path, capsys):
    root = write_imagenet_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    bad = root / "val" / "n01" / "n01_0.JPEG"
    bad.write_bytes(b"GIF89a truncated")
    before = snapshot(root)
    code, _, err = run_script("train_imagenet.py", [
        "--save_dir", tmp_path / "out", "--model", "resnet20", "--data_root", root,
        "--image_size", "32", "--epochs", "1", "-b", "3", "--workers", "0", "--device", "cpu",
        "--no-progress", "--no-tensorboard"], capsys)
    assert_usage_error(code, err, str(bad), "replace or delete")
    assert snapshot(root) == before


# ----------------------------------------------------------------------------- val_fraction 0

def test_val_fraction_zero_means_no_validation_split(tmp_path):
    root = write_imagenet_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    assert build_loaders("imagenet", data_root=root, batch_size=2, val_fraction=0).val is None
    assert build_loaders("imagenet", data_root=root, batch_size=2, val_fraction=0.5).val is not None
    digits = build_loaders("digits", batch_size=64, val_fraction=0)
    assert digits.val is None
    # digits keeps its fixed split otherwise: any other fraction gives the same validation part
    a, b = (build_loaders("digits", batch_size=64, val_fraction=f).val.dataset for f in (0.1, 0.5))
    assert len(a) == len(b) > 0


def test_val_fraction_zero_end_to_end_keeps_last_epoch(tmp_path, capsys):
    code, out, err = run_script("train_prune.py", DIGITS + where(tmp_path) + [
        "--val_fraction", "0", "--num_epochs", "1", "--sl_num_epochs", "1", "--batch_size", "256",
        "--importance_type", "Weight", "--ops_ratios", "0.7", "--iterative_steps", "1",
        "--iters_per_step", "1", "--bn_recalibration_batches", "1"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "out" / "ops_0.7" / "results.json").read_text())
    assert rec["val_acc_finetuned_best"] is None and rec["settings"]["val_fraction"] == 0
    train_state = torch.load(tmp_path / "out" / "ops_0.7" / "finetune.train.pth",
                             weights_only=True)
    assert train_state["best_state"] is None and "val_acc" not in train_state["history"][-1]

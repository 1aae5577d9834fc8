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
    ("train_prune.py", ["--importance_type", "Eigen", "--depthwise", "--cp_rank", "0"],
     ["--cp_rank", "at least 1"]),
    ("iterative_prune.py", ["--importance_type", "Eigen", "--depthwise", "--cp_rank", "-2"],
     ["--cp_rank", "at least 1"]),
    ("prune_imagenet.py", ["--importance_type", "Eigen", "--depthwise", "--cp_rank", "0"],
     ["--cp_rank", "at least 1"]),
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


# ----------------------------------------------------------------------------- every script
# The same bad input given to each of the five scripts. Data in ImageNet's folder layout serves
# all of them (the CIFAR-style scripts read it with --dataset imagenet); the network is the small
# resnet8 at 32 px, so a run that wrongly went ahead would still end within seconds.

SCRIPTS = ["train_prune.py", "iterative_prune.py", "train_unstructured_prune.py",
           "prune_imagenet.py", "train_imagenet.py"]
CIFAR_STYLE = SCRIPTS[:3]
SMALL = ["--model", "resnet8", "--image_size", "32", "--device", "cpu", "--no-progress"]


def folder_args(name, disk, root=None, weights=None):
    """`name` on ImageNet-format folders at `root` (None: dataset.yaml says where), writing under
    disk/out (and disk/ckpt)."""
    data = ["--dataset", "imagenet"] + (["--data_root", root] if root is not None else [])
    if name == "train_imagenet.py":
        return [*data, *SMALL, "--save_dir", disk / "out", "--epochs", "1", "-b", "4",
                "--workers", "0", "--no-tensorboard"]
    if name == "prune_imagenet.py":
        return [*data, *SMALL, "--save_dir", disk / "out", "--weights",
                weights or disk / "ckpt" / "keep.txt", "--importance_type", "Weight",
                "--ops_ratios", "0.7", "--iterative_steps", "1", "--iters_per_step", "1",
                "--batch_size", "4", "--importance_batch_size", "2",
                "--bn_recalibration_batches", "1"]
    extra = ["--pruning_ratio", "0.5"] if name == "train_unstructured_prune.py" else [
        "--ops_ratios", "0.7"]
    return [*data, *SMALL, *where(disk), "--no-tensorboard", "--importance_type", "Weight",
            "--batch_size", "4", "--num_epochs", "1", "--sl_num_epochs", "1",
            "--iterative_steps", "1", "--iters_per_step", "1", "--bn_recalibration_batches", "1",
            *extra]


def assert_refused(name, argv, capsys, disk, *words, code=2):
    """The run stops with exit `code` and one line naming `words`; no file under `disk` changed,
    none appeared."""
    before = snapshot(disk)
    got, _, err = run_script(name, argv, capsys)
    assert got == code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert str(w) in err, err
    assert snapshot(disk) == before
    return err


def dense_file(path, arch="resnet8", classes=3):
    """A dense checkpoint as the CIFAR-style scripts write it (untrained weights do here)."""
    from models import get_model
    from utils.checkpoint import FORMAT, save_atomic
    torch.manual_seed(0)
    model = get_model(arch, classes)
    save_atomic({"format": FORMAT, "kind": "dense", "arch": arch, "num_classes": classes,
                 "dataset": "imagenet", "state_dict": model.state_dict()}, path)
    return path


def training_state(path, arch="resnet8", classes=3):
    """A real per-epoch training checkpoint (utils.engine.train, one step on random images)."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from models import get_model
    from utils.engine import TrainConfig, train
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4) % classes)
    loaders = SimpleNamespace(train=DataLoader(data, batch_size=4), val=None, num_classes=classes)
    train(get_model(arch, classes), loaders, TrainConfig(epochs=1, lr=0.01, milestones=[1]), "cpu",
          path, progress=False, meta={"arch": arch, "num_classes": classes})
    return path


# (the words, not just "truncated": the test's own folder name holds that word too)
TRUNCATED = ["cannot be read", "it is truncated or not a checkpoint"]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture
def small_data(tmp_path):
    return write_imagenet_folder(tmp_path / "data", train_per_class=2, val_per_class=1)


# --- dataset.yaml: the scripts read the repository's file (utils.data.DEFAULT_CONFIG) when
# --data_root is not given; here that file is swapped for a broken copy.

YAML_CASES = {  # name: (text, or None for no file at all; words of the message)
    "missing": (None, ["not found", "--data_root"]),
    "not_yaml": ("imagenet: [data/imagenet\n  cifar10: x", ["not valid YAML", "--data_root"]),
    "not_a_mapping": ("- imagenet\n- cifar10\n", ["must map dataset names", "--data_root"]),
    "wrong_type": ("imagenet: 3\n", ["'imagenet' must be a folder path", "--data_root"]),
    "unknown_key": ("imagenett: data/imagenet\n", ["no folder for 'imagenet'",
                                                   "add 'imagenet: <folder>'"]),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
@pytest.mark.parametrize("name", SCRIPTS)
def test_broken_dataset_yaml(name, case, disk, capsys, monkeypatch):
    import utils.data
    text, words = YAML_CASES[case]
    config = disk / "config" / "dataset.yaml"
    config.parent.mkdir()
    if text is not None:
        config.write_text(text)
    monkeypatch.setattr(utils.data, "DEFAULT_CONFIG", config)
    assert_refused(name, folder_args(name, disk), capsys, disk, str(config), *words)


def test_broken_dataset_yaml_next_to_the_scripts(tmp_path):
    """The real mechanism, in a subprocess: a copy of the code whose own dataset.yaml is broken."""
    import shutil
    import subprocess
    import sys
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("models", "pruners", "utils"):
        shutil.copytree(REPO / part, copy / part, ignore=ignore)
    shutil.copy(REPO / "train_prune.py", copy)
    (copy / "dataset.yaml").write_text("cifar10: [data/cifar10\n")
    before = snapshot(copy)
    proc = subprocess.run([sys.executable, str(copy / "train_prune.py"), "--dataset", "cifar10",
                           "--output_dir", tmp_path / "out", "--save_path_prefix", tmp_path / "ck",
                           "--device", "cpu", "--no-progress", "--no-tensorboard"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(copy / "dataset.yaml") in err and "not valid YAML" in err
    assert snapshot(copy) == before


# --- --device naming a GPU this machine does not have

@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_device_without_that_gpu(name, device, disk, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if torch.cuda.device_count() > 3:
        pytest.skip("cuda:3 exists here")
    argv = folder_args(name, disk, root=disk / "nowhere") + ["--device", device]
    words = (["--device cuda", "no GPU", "--device cpu"] if not torch.cuda.is_available()
             else ["--device cuda:3", "only"])
    assert_refused(name, argv, capsys, disk, *words)


# --- checkpoints of another class count, another architecture, or cut short


@pytest.mark.parametrize("problem", ["classes", "architecture", "truncated"])
@pytest.mark.parametrize("name", CIFAR_STYLE)
def test_bad_pretrained_checkpoint(name, problem, disk, small_data, capsys):
    path = disk / "ckpt" / "dense.pth"
    if problem == "classes":
        dense_file(path, classes=5)
        words = ["does not fit model 'resnet8'", "class count"]
    elif problem == "architecture":
        dense_file(path, arch="vgg11")
        words = ["belongs to model 'vgg11'", "pass the matching --model"]
    else:
        truncate(dense_file(path))
        words = TRUNCATED
    argv = folder_args(name, disk, small_data) + ["--pretrained", path]
    assert_refused(name, argv, capsys, disk, str(path), *words)


@pytest.mark.parametrize("problem", ["classes", "architecture", "truncated"])
@pytest.mark.parametrize("name", CIFAR_STYLE)
def test_resume_from_a_bad_training_state(name, problem, disk, small_data, capsys):
    """--resume continues dense training from <save_path_prefix>/<dataset>_<model>.train.pth."""
    path = disk / "ckpt" / "imagenet_resnet8.train.pth"
    if problem == "classes":
        training_state(path, classes=5)
    elif problem == "architecture":
        training_state(path, arch="vgg11")
    else:
        truncate(training_state(path))
    words = TRUNCATED if problem == "truncated" else ["does not match this run's model",
                                                          "run without --resume"]
    argv = folder_args(name, disk, small_data) + ["--resume"]
    assert_refused(name, argv, capsys, disk, str(path), *words)


@pytest.mark.parametrize("problem", ["classes", "architecture", "truncated"])
def test_train_imagenet_bad_model_file_or_newest(problem, disk, small_data, capsys):
    """train_imagenet.py reads <save_dir>/<model_name>.pth, and with --resume
    <model_name>_newest.pth: each of another class count, another architecture, cut short."""
    from models import get_model
    from utils.checkpoint import save_pruned_model
    source = disk / "out" / "pruned_model.pth"
    newest = disk / "out" / "pruned_model_newest.pth"
    argv = folder_args("train_imagenet.py", disk, small_data)
    argv = argv[:argv.index("--model")] + argv[argv.index("--model") + 2:]  # the file decides
    torch.manual_seed(0)
    if problem == "classes":  # the network file: 5 outputs for 3 classes of data
        save_pruned_model(get_model("resnet8", 5), source, arch="resnet8")
        assert_refused("train_imagenet.py", argv, capsys, disk, str(source), "outputs (5,)",
                       "3 classes")
        save_pruned_model(get_model("resnet8", 3), source, arch="resnet8")
        training_state(newest, classes=5)  # --resume: a training state of 5 classes
        assert_refused("train_imagenet.py", argv + ["--resume"], capsys, disk, str(newest),
                       "does not match")
    elif problem == "architecture":
        save_pruned_model(get_model("resnet8", 3), source, arch="resnet8")
        training_state(newest, arch="vgg11")
        assert_refused("train_imagenet.py", argv + ["--resume"], capsys, disk, str(newest),
                       "'vgg11', not 'resnet8'")
    else:
        save_pruned_model(get_model("resnet8", 3), source, arch="resnet8")
        training_state(newest)
        truncate(newest)
        assert_refused("train_imagenet.py", argv + ["--resume"], capsys, disk, str(newest),
                       *TRUNCATED)
        truncate(source)
        assert_refused("train_imagenet.py", argv, capsys, disk, str(source), *TRUNCATED)


def test_prune_imagenet_truncated_weights(disk, small_data, capsys):
    from models import get_model
    weights = disk / "ckpt" / "resnet8.pth"
    torch.save(get_model("resnet8", 3).state_dict(), weights)
    truncate(weights)
    argv = folder_args("prune_imagenet.py", disk, small_data, weights=weights)
    assert_refused("prune_imagenet.py", argv, capsys, disk, str(weights), *TRUNCATED)


# --- an output folder that cannot be written, an empty class folder, a corrupt image

@pytest.mark.parametrize("name", SCRIPTS)
def test_unwritable_output_folder(name, disk, small_data, capsys):
    blocker = disk / "out" / "keep.txt"  # a file where the output folder should be
    argv = folder_args(name, disk, small_data, weights=disk / "ckpt" / "keep.txt")
    flag = "--save_dir" if name in ("prune_imagenet.py", "train_imagenet.py") else "--output_dir"
    argv[argv.index(flag) + 1] = blocker / "sub"
    assert_refused(name, argv, capsys, disk, str(blocker / "sub"), "not writable", flag)
    if name in CIFAR_STYLE:  # the dense checkpoint folder too
        argv = folder_args(name, disk, small_data)
        argv[argv.index("--save_path_prefix") + 1] = blocker / "sub"
        assert_refused(name, argv, capsys, disk, "not writable", "--save_path_prefix")


def _weights(disk):
    from models import get_model
    torch.manual_seed(0)
    weights = disk / "ckpt" / "resnet8.pth"
    torch.save(get_model("resnet8", 3).state_dict(), weights)
    return weights


@pytest.mark.parametrize("name", SCRIPTS[:4])  # train_imagenet.py: test_empty_class_folder
def test_empty_class_folder_every_script(name, disk, small_data, capsys):
    (small_data / "train" / "n04").mkdir()
    argv = folder_args(name, disk, small_data, weights=_weights(disk))
    assert_refused(name, argv, capsys, disk, str(small_data / "train" / "n04"),
                   "remove the folder")


@pytest.mark.parametrize("name", SCRIPTS[:4])  # train_imagenet.py: test_corrupt_image_stops...
def test_corrupt_image_every_script(name, disk, small_data, capsys):
    bad = small_data / "val" / "n02" / "n02_0.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    weights = _weights(disk)
    argv = folder_args(name, disk, small_data, weights=weights)
    if name in CIFAR_STYLE:
        argv += ["--pretrained", dense_file(disk / "ckpt" / "dense.pth")]
    assert_refused(name, argv, capsys, disk, str(bad), "replace or delete the file")

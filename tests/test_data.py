"""Data loading: real on-disk formats written small, read through the real torchvision classes."""
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from utils import data
from utils.data import DataError, build_loaders, get_dataset_info, iterate_batches, split_train_val


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _pixels(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    """Five training batches of 4 images and a test batch of 6, in cifar-10-batches-py."""
    root = tmp_path_factory.mktemp("c10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_pixels, train_labels = [], []
    for i in range(1, 6):
        pixels, labels = _pixels(rng, 4), [int(v) for v in rng.integers(0, 10, 4)]
        train_pixels.append(pixels)
        train_labels += labels
        _dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": labels,
                                           "data": pixels, "filenames": [f"img{i}_{k}.png" for k in range(4)]})
    test_pixels, test_labels = _pixels(rng, 6), [int(v) for v in rng.integers(0, 10, 6)]
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels,
                                  "data": test_pixels, "filenames": [f"t{k}.png" for k in range(6)]})
    _dump(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)],
                                    "num_cases_per_batch": 4, "num_vis": 3072})
    return root, np.concatenate(train_pixels), train_labels, test_pixels, test_labels


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("c100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 5)):
        _dump(folder / split, {"filenames": [f"{split}{k}.png" for k in range(n)], "batch_label": split,
                               "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                               "coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
                               "data": _pixels(rng, n)})
    _dump(folder / "meta", {"fine_label_names": [f"fine{k}" for k in range(100)],
                            "coarse_label_names": [f"coarse{k}" for k in range(20)]})
    return root


def _normalised(pixels_row, info):
    image = torch.as_tensor(pixels_row.reshape(3, 32, 32), dtype=torch.float32) / 255.0
    return T.Normalize(info.mean, info.std)(image)


def test_cifar10_reads_pickle_batches_with_val_held_out_of_training(cifar10_root):
    root, train_pixels, train_labels, test_pixels, test_labels = cifar10_root
    loaders = build_loaders("cifar10", data_root=root, batch_size=4, val_fraction=0.25, augment=False)
    assert loaders.num_classes == 10 and loaders.image_size == 32
    assert (len(loaders.train.dataset), len(loaders.val.dataset), len(loaders.test.dataset)) == (15, 5, 6)
    train_idx, val_idx = loaders.train.dataset.indices, loaders.val.dataset.indices
    assert set(train_idx).isdisjoint(val_idx) and sorted(train_idx + val_idx) == list(range(20))

    # test split is the test batch, normalised with the CIFAR-10 statistics, in order
    images, targets = next(iter(loaders.test))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert targets.tolist() == test_labels[:4]
    torch.testing.assert_close(images[0], _normalised(test_pixels[0], loaders.info))

    # every validation image is a training-batch image with its training label (eval transform)
    for image, target in loaders.val.dataset:
        match = [k for k in range(20) if torch.allclose(image, _normalised(train_pixels[k], loaders.info))]
        assert match and train_labels[match[0]] == target and match[0] in val_idx


def test_cifar10_augmented_training_batches(cifar10_root):
    root = cifar10_root[0]
    loaders = build_loaders("cifar10", data_root=root, batch_size=4, val_fraction=0.25)
    batches = list(loaders.train)
    assert len(batches) == 3  # 15 samples, last partial batch dropped
    assert all(images.shape == (4, 3, 32, 32) for images, _ in batches)
    kinds = [type(t) for t in loaders.train.dataset.transform.transforms]
    assert T.RandomCrop in kinds and T.RandomHorizontalFlip in kinds
    assert loaders.val.dataset.transform is loaders.test.dataset.transform


def test_same_seed_same_split_and_order(cifar10_root):
    root = cifar10_root[0]

    def run(seed):
        loaders = build_loaders("cifar10", data_root=root, batch_size=5, val_fraction=0.2, seed=seed,
                                augment=False)
        order = [t.tolist() for _ in range(2) for _, t in loaders.train]
        return loaders.val.dataset.indices, order

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_cifar100_fine_labels_and_class_count(cifar100_root):
    loaders = build_loaders("cifar100", data_root=cifar100_root, batch_size=3, val_fraction=0.25)
    assert loaders.num_classes == 100 and loaders.info.num_classes == 100
    assert (len(loaders.train.dataset), len(loaders.val.dataset), len(loaders.test.dataset)) == (9, 3, 5)
    with open(cifar100_root / "cifar-100-python" / "test", "rb") as f:
        fine = pickle.load(f)["fine_labels"]
    assert [t for _, t in loaders.test.dataset] == fine


def test_data_root_may_name_the_batches_folder_itself(cifar10_root):
    root = cifar10_root[0]
    loaders = build_loaders("cifar10", data_root=root / "cifar-10-batches-py", batch_size=4)
    assert len(loaders.test.dataset) == 6


def test_missing_cifar_files_one_line_error(tmp_path, cifar10_root):
    with pytest.raises(DataError) as err:
        build_loaders("cifar100", data_root=tmp_path)
    message = _one_line(err)
    assert str(tmp_path / "cifar-100-python") in message
    assert "train, test, meta" in message and "--download" in message and "--data_root" in message

    partial = tmp_path / "c10" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    for name in ("data_batch_1", "batches.meta"):
        (partial / name).write_bytes((cifar10_root[0] / "cifar-10-batches-py" / name).read_bytes())
    with pytest.raises(DataError) as err:
        build_loaders("cifar10", data_root=tmp_path / "c10")
    message = _one_line(err)
    assert "data_batch_1..5" in message and "missing data_batch_2" in message and "test_batch" in message


def test_corrupt_cifar_batch_is_a_data_error(tmp_path, cifar10_root):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for source in (cifar10_root[0] / "cifar-10-batches-py").iterdir():
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as err:
        build_loaders("cifar10", data_root=tmp_path)
    assert str(folder) in _one_line(err)


def test_download_without_network_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        build_loaders("cifar10", data_root=tmp_path / "new", download=True)
    message = _one_line(err)
    assert "could not download cifar10" in message and "name resolution" in message


# ----------------------------------------------------------------------------- dataset.yaml

def test_yaml_paths_resolve_against_its_folder_and_data_root_overrides(tmp_path, cifar10_root):
    root = cifar10_root[0]
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "c10").symlink_to(root, target_is_directory=True)
    config = tmp_path / "dataset.yaml"
    config.write_text("cifar10: sets/c10\nimagenet: /nowhere/imagenet\n")
    assert data.dataset_root("cifar10", config_path=config) == (tmp_path / "sets" / "c10").resolve()
    assert len(build_loaders("cifar10", config_path=config).test.dataset) == 6

    config.write_text("cifar10: does/not/exist\n")
    assert len(build_loaders("cifar10", data_root=root, config_path=config).test.dataset) == 6
    with pytest.raises(DataError) as err:
        build_loaders("cifar10", config_path=config)
    assert str(tmp_path / "does" / "not" / "exist") in _one_line(err)


@pytest.mark.parametrize("text, fragment", [
    (None, "not found"),
    ("cifar10: [data/c10\n  imagenet: x", "not valid YAML"),
    ("- cifar10\n- imagenet\n", "must map dataset names"),
    ("cifar10: 3\n", "must be a folder path"),
    ("imagenet: data/imagenet\n", "no folder for 'cifar10'"),
])
def test_bad_yaml_is_one_line_error(tmp_path, text, fragment):
    config = tmp_path / "dataset.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(DataError) as err:
        build_loaders("cifar10", config_path=config)
    message = _one_line(err)
    assert fragment in message and str(config) in message and "--data_root" in message


def test_repository_yaml_lists_every_folder_dataset():
    entries = data.load_dataset_config()
    assert set(data.FOLDER_DATASETS) <= set(entries)
    for name in data.FOLDER_DATASETS:
        assert data.dataset_root(name).is_relative_to(data.REPO_ROOT)


def test_digits_needs_no_config(tmp_path):
    loaders = build_loaders("digits", config_path=tmp_path / "absent.yaml")
    assert loaders.num_classes == 10


# ----------------------------------------------------------------------------- image folders

def _write_image(path: Path, size, seed, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def test_imagenet_class_folders(tmp_path):
    classes = ["n001", "n002", "n003"]
    for c, name in enumerate(classes):
        for k in range(3):
            _write_image(tmp_path / "train" / name / f"{name}_{k}.JPEG", (40, 30), 10 * c + k)
    # val lacks n002: indices must still follow the training folders
    _write_image(tmp_path / "val" / "n001" / "v0.JPEG", (30, 40), 100)
    _write_image(tmp_path / "val" / "n003" / "v1.png", (50, 20), 101, fmt="PNG")
    loaders = build_loaders("imagenet", data_root=tmp_path, batch_size=2, val_fraction=0.25)
    assert loaders.num_classes == 3 and loaders.image_size == 224
    assert (len(loaders.train.dataset), len(loaders.val.dataset)) == (7, 2)
    images, targets = next(iter(loaders.test))
    assert images.shape == (2, 3, 224, 224) and targets.tolist() == [0, 2]
    train_images, _ = next(iter(loaders.train))
    assert train_images.shape == (2, 3, 224, 224)
    assert loaders.example_inputs(2).shape == (2, 3, 224, 224)


def _tiny_train(root: Path, wnids):
    # Tiny-ImageNet's training layout: train/<wnid>/images/*.JPEG plus a boxes file
    for c, wnid in enumerate(wnids):
        for k in range(2):
            _write_image(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", (64, 64), 10 * c + k)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")


def test_tiny_imagenet_original_val_annotations(tmp_path):
    wnids = ["n01443537", "n01629819"]
    _tiny_train(tmp_path, wnids)
    lines = []
    for k, wnid in enumerate(["n01629819", "n01443537", "n01629819"]):
        _write_image(tmp_path / "val" / "images" / f"val_{k}.JPEG", (64, 64), 50 + k)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    loaders = build_loaders("tiny_imagenet", data_root=tmp_path, batch_size=3, val_fraction=0.25)
    assert loaders.num_classes == 2 and loaders.image_size == 64
    images, targets = next(iter(loaders.test))
    assert images.shape == (3, 3, 64, 64) and targets.tolist() == [1, 0, 1]
    assert next(iter(loaders.train))[0].shape == (3, 3, 64, 64)

    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError) as err:
        build_loaders("tiny_imagenet", data_root=tmp_path)
    assert "n99999999" in _one_line(err)


def test_tiny_imagenet_val_class_folders(tmp_path):
    wnids = ["n01443537", "n01629819"]
    _tiny_train(tmp_path, wnids)
    _write_image(tmp_path / "val" / wnids[1] / "a.JPEG", (64, 64), 7)
    loaders = build_loaders("tiny_imagenet", data_root=tmp_path, batch_size=2, val_fraction=0.25)
    assert [t for _, t in loaders.test.dataset] == [1]

    _write_image(tmp_path / "val" / "n_unknown" / "b.JPEG", (64, 64), 8)
    with pytest.raises(DataError) as err:
        build_loaders("tiny_imagenet", data_root=tmp_path)
    assert "n_unknown" in _one_line(err)


@pytest.mark.parametrize("name", ["imagenet", "tiny_imagenet"])
def test_missing_image_folders_name_the_folder(tmp_path, name):
    with pytest.raises(DataError) as err:
        build_loaders(name, data_root=tmp_path)
    assert str(tmp_path / "train") in _one_line(err)
    _write_image(tmp_path / "train" / "a" / "x.JPEG", (64, 64), 0)
    with pytest.raises(DataError) as err:
        build_loaders(name, data_root=tmp_path)
    assert str(tmp_path / "val") in _one_line(err)


# ----------------------------------------------------------------------------- digits

def test_digits_fixed_stratified_split():
    images, targets, (train, val, test), _ = data._digits_arrays()
    assert (len(train), len(val), len(test)) == (1077, 270, 450)
    assert len(set(train) | set(val) | set(test)) == len(targets) == 1797
    for part in (train, val, test):
        counts = torch.bincount(targets[part], minlength=10).float()
        torch.testing.assert_close(counts / len(part), torch.bincount(targets).float() / 1797, atol=0.01, rtol=0)
    assert images.shape == (1797, 3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(images[:, 0], images[:, 2])  # grey repeated to three channels


def test_digits_loaders_shapes_normalisation_and_determinism():
    a = build_loaders("digits", batch_size=100, seed=0, augment=False)
    b = build_loaders("digits", batch_size=100, seed=0, augment=False)
    c = build_loaders("digits", batch_size=100, seed=1, augment=False, val_fraction=0.3)
    assert (len(a.train.dataset), len(a.val.dataset), len(a.test.dataset)) == (1077, 270, 450)
    assert a.info.mean == get_dataset_info("digits").mean

    train_a = [(x, y) for x, y in a.train]
    train_b = [(x, y) for x, y in b.train]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(train_a, train_b))
    assert [y.tolist() for _, y in c.train] != [y.tolist() for _, y in train_a]
    # the split (test set included) does not depend on the seed
    for loader_a, loader_c in ((a.test, c.test), (a.val, c.val)):
        assert all(torch.equal(p[0], q[0]) for p, q in zip(loader_a, loader_c))

    pixels = torch.cat([x for x, _ in train_a])
    assert pixels.shape[1:] == (3, 32, 32)
    assert abs(float(pixels.mean())) < 0.05 and abs(float(pixels.std()) - 1) < 0.05

    # no sample appears in two splits
    def keys(loader):
        return {x.numpy().tobytes() for batch, _ in loader for x in batch}
    train_keys, val_keys, test_keys = keys(a.train), keys(a.val), keys(a.test)
    assert not (train_keys & val_keys) and not (train_keys & test_keys) and not (val_keys & test_keys)


def test_digits_augmentation_crops_without_flips():
    loaders = build_loaders("digits", batch_size=16)
    kinds = [type(t) for t in loaders.train.dataset.transform.transforms]
    assert T.RandomCrop in kinds and T.RandomHorizontalFlip not in kinds
    images, _ = next(iter(loaders.train))
    assert images.shape == (16, 3, 32, 32)


# ----------------------------------------------------------------------------- helpers

def test_split_train_val_is_deterministic_and_disjoint():
    train, val = split_train_val(100, 0.1, seed=5)
    assert (train, val) == split_train_val(100, 0.1, seed=5)
    assert val != split_train_val(100, 0.1, seed=6)[1]
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert split_train_val(10, 0.0, 0) == (list(range(10)), [])


def test_iterate_batches_cycles_and_stops():
    loader = [(torch.full((2, 1), float(k)), torch.tensor([k, k])) for k in range(3)]
    got = [int(x[0, 0]) for x, _ in iterate_batches(loader, 7)]
    assert got == [0, 1, 2, 0, 1, 2, 0]
    assert len(list(iterate_batches(loader, 2))) == 2
    assert list(iterate_batches([], 5)) == [] and list(iterate_batches(loader, 0)) == []


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(dataset="mnist"), "digits, cifar10, cifar100, tiny_imagenet, imagenet"),
    (dict(dataset="digits", val_fraction=1.0), "--val_fraction"),
    (dict(dataset="digits", batch_size=0), "--batch_size"),
    (dict(dataset="digits", num_workers=-1), "--num_workers"),
])
def test_bad_arguments_are_data_errors(kwargs, fragment):
    with pytest.raises(DataError) as err:
        build_loaders(**kwargs)
    assert fragment in _one_line(err)
    assert isinstance(err.value, ValueError)


def test_dataset_info_and_example_inputs():
    assert get_dataset_info("CIFAR-100").num_classes == 100
    assert get_dataset_info("tiny-imagenet").image_size == 64
    loaders = build_loaders("digits", batch_size=8)
    assert loaders.example_inputs().shape == (1, 3, 32, 32)
    assert float(loaders.example_inputs(3).abs().sum()) == 0
    assert loaders.example_inputs(2, random=True).std() > 0

"""Datasets, transforms and loaders.

Every script gets its data through `build_loaders(dataset, ...)`, which returns the training
loader, a validation loader held out from the *training* set (used for checkpoint selection)
and the test loader (the dataset's own test / val split, only ever reported).

Supported datasets:
  digits         scikit-learn's embedded 8x8 handwritten digits, upsampled to 3x32x32; no files.
  cifar10/100    torchvision's CIFAR classes reading the python pickle batches.
  tiny_imagenet  class folders, 64x64 (val may also use the original val_annotations.txt layout).
  imagenet       class folders, 224x224 crops.

Multi-process runs (torchrun) take this process's part with `shard_loaders(loaders, seed)`:
DistributedSampler-style training order with per-image seeded augmentation, and disjoint
val/test shards without padding (exact all-reduced metrics).

Folders come from dataset.yaml (repository root) unless `data_root` is given. Problems the user
can fix (missing files, bad yaml, bad arguments) raise `DataError` with a one-line message.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "dataset.yaml"

# The digits split is fixed (independent of the run seed) so every run sees the same test set.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_VAL_FRACTION = 0.15


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        message = str(message)
        if "Original Traceback" in message and "DataError: " in message:
            # re-raised by a DataLoader worker: keep the original one-line message
            message = message.rsplit("DataError: ", 1)[1]
        super().__init__(" ".join(message.split()))


def read_image(path: str):
    """An image file as an RGB PIL image; an unreadable (corrupt, truncated, not an image) file
    is a DataError naming it."""
    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); "
                        "replace or delete the file") from None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (3, self.image_size, self.image_size)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_STATIC_INFO: Dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": DatasetInfo("tiny_imagenet", 200, 64, (0.4802, 0.4481, 0.3975),
                                 (0.2302, 0.2265, 0.2262)),
    "imagenet": DatasetInfo("imagenet", 1000, 224, _IMAGENET_MEAN, _IMAGENET_STD),
}
DATASET_NAMES: Tuple[str, ...] = ("digits", "cifar10", "cifar100", "tiny_imagenet", "imagenet")
FOLDER_DATASETS = ("cifar10", "cifar100", "tiny_imagenet", "imagenet")


def canonical_name(name: str) -> str:
    """'CIFAR10', 'tiny-imagenet' -> 'cifar10', 'tiny_imagenet'; unknown names raise DataError."""
    squashed = {known.replace("_", ""): known for known in DATASET_NAMES}
    key = squashed.get(str(name).strip().lower().replace("-", "").replace("_", ""))
    if key is None:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    return key


def get_dataset_info(name: str) -> DatasetInfo:
    key = canonical_name(name)
    if key == "digits":
        mean, std = _digits_arrays()[3]
        return DatasetInfo("digits", 10, 32, (mean,) * 3, (std,) * 3)
    return _STATIC_INFO[key]


# ----------------------------------------------------------------------------- dataset.yaml

def load_dataset_config(path: Optional[os.PathLike] = None) -> Dict[str, Optional[str]]:
    """Read dataset.yaml: {dataset name: root folder as written}."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise DataError(f"dataset config {path} not found; create it (dataset name: folder per line) "
                        f"or pass --data_root")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset config {path} is not valid YAML ({first}); fix it or pass --data_root")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise DataError(f"dataset config {path} must map dataset names to folders "
                        f"(e.g. 'cifar10: data/cifar10'); fix it or pass --data_root")
    entries: Dict[str, Optional[str]] = {}
    for key, value in config.items():
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise DataError(f"dataset config {path}: entry '{key}' must be a folder path, "
                            f"got {type(value).__name__}; fix it or pass --data_root")
        try:
            key = canonical_name(key)
        except DataError:  # entries for other data sets are allowed and ignored
            key = str(key)
        entries[key] = None if value is None else str(value)
    return entries


def dataset_root(name: str, data_root: Optional[os.PathLike] = None,
                 config_path: Optional[os.PathLike] = None) -> Path:
    """The folder of dataset `name`: `data_root` if given (relative to the working directory),
    otherwise the dataset.yaml entry (relative to the yaml's folder, i.e. the repository root)."""
    key = canonical_name(name)
    if data_root is not None and str(data_root) != "":
        return Path(os.path.expandvars(os.path.expanduser(str(data_root)))).resolve()
    config_file = Path(config_path) if config_path is not None else DEFAULT_CONFIG
    entry = load_dataset_config(config_file).get(key)
    if not entry:
        raise DataError(f"dataset config {config_file} has no folder for '{key}'; "
                        f"add '{key}: <folder>' to it or pass --data_root")
    root = Path(os.path.expandvars(os.path.expanduser(entry)))
    if not root.is_absolute():
        root = config_file.resolve().parent / root
    return root.resolve()


# ----------------------------------------------------------------------------- dataset views

class TransformedSubset(Dataset):
    """The samples `indices` of `base` (which yields (image, target)), with `transform` applied
    to the image. Train and validation views share one base, so data is loaded only once."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Optional[Callable]):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target = self.base[self.indices[i]]
        if self.transform is not None:
            image = self.transform(image)
        return image, target

    @property
    def targets(self) -> List[int]:
        base_targets = getattr(self.base, "targets")
        return [int(base_targets[i]) for i in self.indices]


class TensorImages(Dataset):
    """In-memory images (N, C, H, W) and integer targets."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], int(self.targets[i])


class ImageList(Dataset):
    """(path, class index) samples read as RGB PIL images; used for val folders whose class
    indices must follow the training folder's."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str]):
        self.samples = samples
        self.classes = classes
        self.targets = [target for _, target in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return read_image(path), target


def split_train_val(num_samples: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Deterministic random hold-out of round(val_fraction * n) training samples (at least one
    when val_fraction > 0)."""
    if val_fraction <= 0:
        return list(range(num_samples)), []
    num_val = max(1, int(round(num_samples * val_fraction)))
    if num_val >= num_samples:
        raise DataError(f"val_fraction {val_fraction} leaves no training samples out of {num_samples}; "
                        f"use a smaller --val_fraction")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])


# ----------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def _digits_arrays():
    """Raw [0,1] images (N,3,32,32) float32, targets, (train, val, test) indices, (mean, std)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    images = F.interpolate(images[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()
    targets = torch.as_tensor(digits.target, dtype=torch.long)

    all_idx = list(range(len(targets)))
    pool, test = train_test_split(all_idx, test_size=DIGITS_TEST_FRACTION,
                                  stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    pool_val = DIGITS_VAL_FRACTION / (1.0 - DIGITS_TEST_FRACTION)
    train, val = train_test_split(pool, test_size=pool_val, stratify=digits.target[pool],
                                  random_state=DIGITS_SPLIT_SEED)
    split = tuple(sorted(int(i) for i in part) for part in (train, val, test))
    train_pixels = images[split[0], 0]
    stats = (float(train_pixels.mean()), float(train_pixels.std()))
    return images, targets, split, stats


def _digits_bases():
    images, targets, (train, val, test), _ = _digits_arrays()
    return (TensorImages(images[train], targets[train]), TensorImages(images[val], targets[val]),
            TensorImages(images[test], targets[test]))


# ----------------------------------------------------------------------------- CIFAR

@dataclass(frozen=True)
class _CifarSpec:
    torchvision_class: type
    folder: str
    files: Tuple[str, ...]
    files_hint: str


_CIFAR = {
    "cifar10": _CifarSpec(tv_datasets.CIFAR10, "cifar-10-batches-py",
                          tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
                          "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": _CifarSpec(tv_datasets.CIFAR100, "cifar-100-python", ("train", "test", "meta"),
                           "train, test, meta"),
}


@functools.lru_cache(maxsize=None)
def _presence_checked(cls: type) -> type:
    """The torchvision CIFAR class with its per-file checksum test reduced to "file exists".

    Hashing 170 MB on every load is slow, and copies that are re-packed (or the small files the
    tests write) would be rejected with torchvision's generic multi-line message; a truncated or
    foreign file still fails loudly when it is unpickled. Downloads keep the archive checksum.
    """
    return type(f"Local{cls.__name__}", (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _cifar_bases(key: str, root: Path, download: bool):
    spec = _CIFAR[key]
    if root.name == spec.folder:  # accept the batches folder itself as the root
        root = root.parent
    cls = _presence_checked(spec.torchvision_class)
    folder = root / spec.folder
    if download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            cls(str(root), train=True, download=True)
        except (OSError, RuntimeError, tarfile.TarError) as err:
            reason = str(getattr(err, "reason", "") or err).strip().splitlines()
            raise DataError(f"could not download {key} into {root} ({reason[0] if reason else type(err).__name__}); "
                            f"check the internet connection or place {spec.folder}/ ({spec.files_hint}) "
                            f"there and pass --data_root")
    missing = [name for name in spec.files if not (folder / name).is_file()]
    if missing:
        which = "not found" if len(missing) == len(spec.files) else f"incomplete (missing {', '.join(missing)})"
        raise DataError(f"{key} files {which} in {folder} (expected {spec.files_hint}); pass --download "
                        f"(needs internet) or --data_root pointing at the folder that holds {spec.folder}/")
    try:
        return cls(str(root), train=True), cls(str(root), train=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"could not read the {key} batches in {folder} ({type(err).__name__}: {err}); "
                        f"replace the files (e.g. delete them and pass --download)")


# ----------------------------------------------------------------------------- image folders

def _read_annotated_val(val_dir: Path, class_to_idx: Dict[str, int]) -> List[Tuple[str, int]]:
    """Tiny-ImageNet's original layout: val/images/*.JPEG and val/val_annotations.txt with
    lines 'file<TAB>wnid<TAB>box...'."""
    samples = []
    annotations = val_dir / "val_annotations.txt"
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise DataError(f"{annotations} line {number} is malformed (expected 'file<TAB>class ...'); "
                            f"fix the file")
        filename, wnid = fields[0], fields[1]
        if wnid not in class_to_idx:
            raise DataError(f"{annotations} line {number} names class '{wnid}' that has no folder in "
                            f"{val_dir.parent / 'train'}; use matching train and val folders")
        path = val_dir / "images" / filename
        if not path.is_file():
            raise DataError(f"image {path} listed in {annotations} is missing; restore it or fix the file")
        samples.append((str(path), class_to_idx[wnid]))
    if not samples:
        raise DataError(f"{annotations} lists no images; fix the file or use val/<class>/ folders")
    return samples


def _folder_bases(key: str, root: Path):
    layout = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"
    train_dir, val_dir = root / "train", root / "val"
    for folder, role in ((train_dir, "training"), (val_dir, "validation")):
        if not folder.is_dir():
            raise DataError(f"{key} {role} folder {folder} not found (expected {layout}); "
                            f"set the folder in dataset.yaml or pass --data_root")
    def has_images(folder):  # ImageFolder looks into sub-folders too (tiny_imagenet: <class>/images/)
        return any(name.lower().endswith(IMG_EXTENSIONS)
                   for _, _, names in os.walk(folder, followlinks=True) for name in names)

    for entry in sorted(os.scandir(train_dir), key=lambda e: e.name):
        if entry.is_dir() and not has_images(entry.path):
            raise DataError(f"{key} class folder {entry.path} holds no images (expected "
                            f"{', '.join(IMG_EXTENSIONS[:3])}...); add its images or remove the "
                            "folder (and the same class from val/)")
    try:
        train = tv_datasets.ImageFolder(str(train_dir), loader=read_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{key} training folder {train_dir} has no usable class folders or images "
                        f"({str(err).splitlines()[0]}); expected {layout}")
    if key == "tiny_imagenet" and (val_dir / "val_annotations.txt").is_file():
        samples = _read_annotated_val(val_dir, train.class_to_idx)
    else:
        val_classes = sorted(entry.name for entry in os.scandir(val_dir) if entry.is_dir())
        unknown = [name for name in val_classes if name not in train.class_to_idx]
        if unknown:
            raise DataError(f"{key} val folder {val_dir} has classes missing from {train_dir} "
                            f"(e.g. '{unknown[0]}'); use matching train and val folders")
        samples = make_dataset(str(val_dir), train.class_to_idx, extensions=IMG_EXTENSIONS,
                               allow_empty=True)
        if not samples:
            raise DataError(f"{key} val folder {val_dir} holds no images (expected {layout}); "
                            f"fix the folder or pass --data_root")
    return train, ImageList(samples, train.classes)


# ----------------------------------------------------------------------------- transforms

AUTO_AUGMENT_POLICIES = ("ta_wide", "ra", "imagenet", "cifar10", "svhn")


def _auto_augment(policy: Optional[str]) -> List[Callable]:
    """torchvision's automatic augmentation called `policy` (the names of torchvision's
    classification reference: ta_wide, ra, or an AutoAugment policy), as a list of PIL transforms."""
    if not policy or policy == "none":
        return []
    if policy == "ta_wide":
        return [T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR)]
    if policy == "ra":
        return [T.RandAugment(interpolation=T.InterpolationMode.BILINEAR)]
    if policy in ("imagenet", "cifar10", "svhn"):
        return [T.AutoAugment(T.AutoAugmentPolicy(policy), interpolation=T.InterpolationMode.BILINEAR)]
    raise DataError(f"unknown --auto-augment policy '{policy}'; choose one of: "
                    f"{', '.join(AUTO_AUGMENT_POLICIES)} or none")


def build_transforms(info: DatasetInfo, augment: bool = True,
                     auto_augment: Optional[str] = None) -> Tuple[Callable, Callable]:
    """(train transform, eval transform) for a dataset; the train one equals the eval one when
    `augment` is False. ImageNet-style data is resized to 256/224 of `info.image_size` and
    centre-cropped for evaluation (random-resized crops for training)."""
    normalize = T.Normalize(info.mean, info.std)
    extra = _auto_augment(auto_augment) if augment else []
    if info.name == "digits":  # tensors already 3x32x32 in [0,1]; no flips: digits are not symmetric
        eval_tf = normalize
        train_tf = T.Compose([T.RandomCrop(32, padding=2), normalize])
    elif info.name in ("cifar10", "cifar100"):
        eval_tf = T.Compose([T.ToTensor(), normalize])
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *extra,
                              T.ToTensor(), normalize])
    elif info.name == "tiny_imagenet":
        eval_tf = T.Compose([T.ToTensor(), normalize])
        train_tf = T.Compose([T.RandomCrop(64, padding=8), T.RandomHorizontalFlip(), *extra,
                              T.ToTensor(), normalize])
    else:  # imagenet
        crop = info.image_size
        resize = int(round(crop * 256 / 224))
        eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), normalize])
        train_tf = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), *extra,
                              T.ToTensor(), normalize])
    return (train_tf if augment else eval_tf), eval_tf


# ----------------------------------------------------------------------------- loaders

@dataclass
class Loaders:
    train: DataLoader
    val: Optional[DataLoader]
    test: DataLoader
    num_classes: int
    image_size: int
    info: DatasetInfo

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def example_inputs(self, batch: int = 1, random: bool = False,
                       device: Optional[torch.device] = None) -> torch.Tensor:
        """A (batch, 3, H, W) input for tracing / FLOPs counting: zeros, or N(0,1) if `random`."""
        shape = (batch,) + self.input_shape
        return torch.randn(shape, device=device) if random else torch.zeros(shape, device=device)


def _check_arguments(batch_size, eval_batch_size, num_workers, val_fraction) -> None:
    for flag, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"--{flag} must be a positive integer, got {value!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"--num_workers must be a non-negative integer, got {num_workers!r}")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0
            and not math.isnan(val_fraction)):
        raise DataError(f"--val_fraction must be in [0, 1), got {val_fraction!r}")


def build_loaders(dataset: str, data_root: Optional[os.PathLike] = None, batch_size: int = 128,
                  eval_batch_size: Optional[int] = None, num_workers: int = 0, download: bool = False,
                  val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
                  pin_memory: bool = False, config_path: Optional[os.PathLike] = None,
                  image_size: Optional[int] = None, auto_augment: Optional[str] = None) -> Loaders:
    """Train / validation / test loaders for `dataset`.

    The validation split is `val_fraction` of the training set chosen by `seed` and read with
    the eval transform; `digits` instead has a fixed 60/15/25 train/val/test split that does not
    depend on `seed` or `val_fraction` (except that `val_fraction` 0 means no validation split
    for every dataset: `val` is None and training keeps its last epoch). The train loader shuffles with its own generator seeded
    by `seed` (same seed, same order) and drops a last partial batch when there is more than
    one batch (a lone sample would break BatchNorm in training mode).
    image_size: ImageNet crop size (default 224);
    a smaller one makes quick runs on CPU. auto_augment: a policy of `AUTO_AUGMENT_POLICIES`.
    """
    key = canonical_name(dataset)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    _check_arguments(batch_size, eval_batch_size, num_workers, val_fraction)
    info = get_dataset_info(key)
    if image_size is not None:
        if key != "imagenet":
            raise DataError(f"--image_size applies to imagenet only, not {key}; "
                            "drop the flag")
        if not isinstance(image_size, int) or image_size < 8:
            raise DataError(f"--image_size must be an integer of at least 8, got {image_size!r}")
        info = replace(info, image_size=image_size)
    train_tf, eval_tf = build_transforms(info, augment, auto_augment)

    if key == "digits":
        train_base, val_base, test_base = _digits_bases()
        train_set = TransformedSubset(train_base, range(len(train_base)), train_tf)
        val_set = TransformedSubset(val_base, range(len(val_base)), eval_tf) if val_fraction > 0 else None
        test_set = TransformedSubset(test_base, range(len(test_base)), eval_tf)
        num_classes = info.num_classes
    else:
        root = dataset_root(key, data_root, config_path)
        if key in _CIFAR:
            train_base, test_base = _cifar_bases(key, root, download)
        else:
            train_base, test_base = _folder_bases(key, root)
        train_idx, val_idx = split_train_val(len(train_base), val_fraction, seed)
        train_set = TransformedSubset(train_base, train_idx, train_tf)
        val_set = TransformedSubset(train_base, val_idx, eval_tf) if val_idx else None
        test_set = TransformedSubset(test_base, range(len(test_base)), eval_tf)
        num_classes = len(train_base.classes)
        info = replace(info, num_classes=num_classes)

    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    # Not persistent: the loader draws its workers' seeds once per iterator, so a run resumed at
    # epoch k must create one per epoch too to draw the same random numbers as an uninterrupted one.
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                       generator=torch.Generator().manual_seed(int(seed)),
                       **dict(common, persistent_workers=False))
    val = DataLoader(val_set, batch_size=eval_batch_size, shuffle=False, **common) if val_set else None
    test = DataLoader(test_set, batch_size=eval_batch_size, shuffle=False, **common)
    return Loaders(train=train, val=val, test=test, num_classes=num_classes,
                   image_size=info.image_size, info=info)


def iterate_batches(loader: Iterable, n: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """At most `n` (inputs, targets) batches from `loader`, starting over when it runs out;
    stops early only if the loader is empty."""
    produced = 0
    while produced < n:
        empty = True
        for batch in loader:
            empty = False
            inputs, targets = batch[0], batch[1]
            yield inputs, targets
            produced += 1
            if produced >= n:
                return
        if empty:
            return


# ----------------------------------------------------------------------------- one shard per process

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of sample `index`'s augmentation in `epoch` (a 63-bit mix of the three)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index)) % 2**64
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 29)) % 2**63


class EpochIndexSampler(torch.utils.data.DistributedSampler):
    """torch's DistributedSampler (shuffled by seed + epoch, every process a disjoint, equally long
    part) that yields (index, epoch) so the dataset can seed each sample's augmentation."""

    def __iter__(self):
        epoch = self.epoch
        return ((i, epoch) for i in super().__iter__())


class PerSampleSeeded(Dataset):
    """Dataset view whose item (index, epoch) is `base[index]` drawn with the torch RNG seeded by
    `sample_seed(seed, epoch, index)`: an image's random crop and flip depend on the seed, the
    epoch and the image only, not on which process or worker loads it. So the global batch of a
    run on N processes is the one of a single-process run with N times the per-process batch."""

    def __init__(self, base: Dataset, seed: int):
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (torch.manual_seed would also re-seed CUDA's, unrestored)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.base[index]


def shard_loaders(loaders: Loaders, seed: int = 0, rank: Optional[int] = None,
                  world: Optional[int] = None) -> Loaders:
    """The loaders of this process in a (possibly) multi-process run, from `build_loaders`' ones.

    train: `EpochIndexSampler(seed=seed, shuffle=True, drop_last=True)` over `world` processes
      (call `loader.sampler.set_epoch(e)` each epoch; `utils.engine.train` does) with per-sample
      seeded augmentation (`PerSampleSeeded`);
    val / test: rank, rank + world, ... of the samples — disjoint, without the padding duplicates
      of DistributedSampler, so all-reduced sums of metrics are exact.
    Batch sizes are per process. With world = 1 this is still the same recipe, which is what
    makes single-process and multi-process runs comparable."""
    from .distributed import rank as _rank, shard_indices, world_size as _world

    r = _rank() if rank is None else rank
    w = _world() if world is None else world
    train = loaders.train
    sampler = EpochIndexSampler(train.dataset, num_replicas=w, rank=r, shuffle=True,
                                seed=int(seed), drop_last=True)
    common = dict(num_workers=train.num_workers, pin_memory=train.pin_memory,
                  persistent_workers=train.num_workers > 0)
    new_train = DataLoader(PerSampleSeeded(train.dataset, seed), batch_size=train.batch_size,
                           sampler=sampler, drop_last=len(sampler) > train.batch_size,
                           **dict(common, persistent_workers=False))  # see build_loaders

    def shard(loader):
        if loader is None:
            return None
        indices = shard_indices(len(loader.dataset), r, w)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices, **common)

    return replace(loaders, train=new_train, val=shard(loaders.val), test=shard(loaders.test))


class BatchStream:
    """Fresh training batches on demand, for importance estimation and BatchNorm re-estimation.

    `stream(n)` gives the next n batches of a stream of shuffled passes over the training set
    seeded by `seed`, each image augmented as `PerSampleSeeded` draws it (seed, pass, image): the
    same seed gives the same batches whether the network was just trained in this process or
    loaded from disk. Under torchrun every process draws the same n batches and loads only its own
    share (batches rank, rank + world, ...), so no image is decoded twice and the union over
    processes is exactly what one process would see."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False):
        if len(dataset) == 0:
            raise DataError("the training set is empty; nothing to estimate importance on")
        self.dataset = PerSampleSeeded(dataset, seed)
        self.batch_size = min(int(batch_size), len(dataset))
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = int(seed)
        self.restart()

    def restart(self) -> None:
        """Back to the first batch: every pruning target then scores on the same batches, whether
        the targets before it ran in this process or were skipped by --resume."""
        self.generator = torch.Generator().manual_seed(self.seed)
        self._passes = 0
        self._pool: List[Tuple[int, int]] = []

    def _take(self, count: int) -> List[Tuple[int, int]]:
        while len(self._pool) < count:
            order = torch.randperm(len(self.dataset), generator=self.generator).tolist()
            self._pool.extend((index, self._passes) for index in order)
            self._passes += 1
        taken, self._pool = self._pool[:count], self._pool[count:]
        return taken

    def __call__(self, n: int, shard: bool = True) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from .distributed import shard_indices
        batches = [self._take(self.batch_size) for _ in range(n)]
        if shard:
            batches = [batches[i] for i in shard_indices(n)]
        if not batches:
            return iter(())
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.pin_memory)
        return ((batch[0], batch[1]) for batch in loader)

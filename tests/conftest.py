"""Shared fixtures: tiny data sets in their real on-disk formats."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_imagenet_folder(root: Path, classes=("n01", "n02", "n03"), train_per_class: int = 8,
                          val_per_class: int = 4, size=(40, 36), seed: int = 0) -> Path:
    """ImageNet's layout: <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG, small random
    images whose mean colour depends on the class (so a network can learn something)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                base = np.array([60 + 70 * c, 200 - 60 * c, 40 + 50 * (c % 2)], dtype=np.int16)
                noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{k}.JPEG", format="JPEG")
    return root


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory) -> Path:
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))

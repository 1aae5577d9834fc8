"""What several test files share: running a script as a user would, checking the one-line error
of bad input, and tiny data sets in their real on-disk formats."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def run_script(script, *args, procs: int = 1, env=None, cwd=REPO, timeout: int = 900):
    """`python <script> args` (with `procs` > 1: under torchrun, gloo) from the repository."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(procs)]
    return subprocess.run(launcher + [str(REPO / script), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def assert_one_line_error(proc, *words):
    """Bad input: a non-zero exit and one line on stderr, no traceback, naming `words`."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


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

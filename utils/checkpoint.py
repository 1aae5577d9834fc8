"""Checkpoints and result records, written atomically (temp file in the same folder + rename).

Two kinds of file:
  * training checkpoints: {'format', 'arch', 'num_classes', 'state_dict', 'optimizer', 'scheduler',
    'epoch', 'best', 'rng', ...}: resumable, loaded into a freshly built model;
  * pruned models: the whole module pickled (its shapes differ from the dense definition), loaded back
    with one call: `utils.checkpoint.load_pruned_model(path)`.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

FORMAT = "hessian-pruning/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_atomic(obj: Any, path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json(obj: Any, path) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    _atomic_write(Path(path), lambda f: f.write(data + b"\n"))


def _load(path, weights_only: bool):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError,
            AttributeError, ModuleNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first[:160]}); it is truncated "
                              "or not a checkpoint of this tool: delete it or pass another") from None


def load_checkpoint(path) -> dict:
    ckpt = _load(path, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this tool; "
                              "delete it or pass another")
    return ckpt


def load_state_into(model: nn.Module, state_dict: dict, path, arch: Optional[str] = None) -> None:
    """Load weights, turning a shape/key mismatch into a one-line error that names the file."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise CheckpointError(f"checkpoint {path} does not fit model '{arch or type(model).__name__}' "
                              f"({detail[:160]}); it belongs to another architecture or class count: "
                              "pass the matching --model/--dataset or another file") from None


def save_pruned_model(model: nn.Module, path, /, **meta) -> None:
    """The whole pruned module plus metadata; `load_pruned_model` gives it back ready to use.
    (`model` and `path` are positional-only, so `meta` may carry a `model=` name.)"""
    was = next(model.parameters()).device if any(True for _ in model.parameters()) else None
    model_cpu = model.to("cpu")
    try:
        save_atomic({"format": FORMAT, "kind": "pruned_model", "model": model_cpu, "meta": meta}, path)
    finally:
        if was is not None:
            model.to(was)


def load_pruned_model(path, device="cpu", with_meta: bool = False):
    """Load a network written by train_prune.py / iterative_prune.py (pruned_model.pth).

    >>> from utils.checkpoint import load_pruned_model
    >>> model = load_pruned_model("outputs/.../pruned_model.pth")
    """
    obj = _load(path, weights_only=False)
    if not isinstance(obj, dict) or obj.get("kind") != "pruned_model":
        raise CheckpointError(f"{path} is not a pruned model written by this tool; pass a "
                              "pruned_model.pth from an output folder")
    model = obj["model"].to(device).eval()
    return (model, obj.get("meta", {})) if with_meta else model


def check_writable(folder, flag: str = "--output_dir") -> Path:
    """Create `folder` if needed and make sure we can write there, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise CheckpointError(f"output directory {folder} is not writable ({err.strerror}); "
                              f"pass a writable {flag}") from None
    return folder

"""Checkpoints and result records, written atomically (temp file in the same folder + rename).

Every file is read with `torch.load(..., weights_only=True)`: tensors and plain data only, so
loading never runs code from the file. A file that would need more (a crafted pickle, or a file
of an older version of this tool, which pickled whole modules) is refused with one line; older
files are converted once, on request, with `python -m utils.checkpoint convert OLD NEW`.

Two kinds of file:
  * training checkpoints: {'format', 'arch', 'num_classes', 'state_dict', 'optimizer', 'scheduler',
    'epoch', 'best', 'rng', ...}: resumable, loaded into a freshly built model;
  * pruned models: {'format', 'kind': 'pruned_model', 'structure', 'state_dict', 'extra', 'meta'}
    where 'structure' describes every module (class name, plain attributes, parameter and buffer
    names, children). `load_pruned_model(path)` rebuilds the network from it: modules are created
    only from classes looked up by name in an allow-list of packages (SAFE_MODULES) and the
    tensors take the saved (pruned) shapes.
"""
from __future__ import annotations

import argparse
import errno
import glob
import importlib
import json
import os
import pickle
import pickletools
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from utils.log import RunFailure

FORMAT = "hessian-pruning/1"
PRUNED_FORMAT = "hessian-pruning/pruned-2"

# Packages whose nn.Module classes a pruned-model file may name. Looking a class up by name and
# creating it with __new__ runs no code from the file.
SAFE_MODULES = ("torch.nn", "torchvision.models", "torchvision.ops", "models", "pruners")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def _remove_stale_temps(path: Path) -> None:
    """Delete `.<name>.*.tmp` left next to `path` by a writer that was killed (SIGKILL, power
    loss) before it could clean up; one writer per path, so none of them is still being written."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def remove_stale_temps(folder) -> None:
    """Delete every `.<name>.*.tmp` of a killed writer under `folder`: a resumed run owns its
    folders, and a finished target it skips is never written again to clean its own."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.rglob(".*.*.tmp"):
            _remove_stale_temps(stale.parent / stale.name[1:].rsplit(".", 2)[0])


def _disk_full(folder: Path) -> bool:
    """Is (almost) no space left where `folder` is? Asked while the failed temp file still
    takes its space."""
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _write_failure(path: Path, err: BaseException) -> Optional[RunFailure]:
    """The one-line failure for a write that could not finish (full disk, quota, I/O error).
    torch.save reports a failed write of its file as a RuntimeError of its zip writer
    ("[enforce fail at inline_container.cc] unexpected pos ...", "file write failed")."""
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        full = err.errno in (errno.ENOSPC, errno.EDQUOT) or _disk_full(path.parent)
    elif isinstance(err, RuntimeError) and any(
            word in str(err) for word in ("inline_container", "PytorchStreamWriter", "write")):
        reason = str(err).splitlines()[0]
        full = _disk_full(path.parent)
    else:
        return None
    if full:
        return RunFailure(f"no space left on the device writing {path} (the previous file, if any, "
                          "is unchanged); free space or pass another --output_dir")
    return RunFailure(f"could not write {path} ({reason}; the previous file, if any, is "
                      "unchanged); check the disk or pass another --output_dir")


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename over `path`: at every moment
    `path` is the previous complete file or the new complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        failure = _write_failure(path, err)  # before the temp file gives its space back
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if failure is not None:
            raise failure from None
        raise


def save_atomic(obj: Any, path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json(obj: Any, path) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    _atomic_write(Path(path), lambda f: f.write(data + b"\n"))


def write_text(text: str, path) -> None:
    data = text.encode()
    _atomic_write(Path(path), lambda f: f.write(data))


# ----------------------------------------------------------------------------- safe reading

def _numpy_array_globals() -> list:
    """What an ndarray pickle names (old training checkpoints keep numpy's RNG key as one)."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    names = [_reconstruct, np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):
        names.append(np.dtypes.UInt32DType)
    return names


_OUR_GLOBALS = ("torch.", "torchvision.", "models.", "pruners.", "utils.", "collections.",
                "functools.", "numpy.", "argparse.Namespace", "pathlib.", "copyreg._reconstructor",
                "_codecs.encode", "builtins.set", "builtins.frozenset", "builtins.slice",
                "builtins.range", "builtins.complex", "builtins.bytearray")


def _ours(name: str) -> bool:
    """Could this pickled global come from a file an older version of this tool wrote?"""
    return name.startswith(_OUR_GLOBALS)


def _pickle_globals(path: Path) -> set:
    """The globals a pickle file would import, read from its opcodes (nothing is unpickled)."""
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: scan the raw pickle stream(s)
        pass
    names, strings = set(), []
    try:
        with open(path, "rb") as f:
            while True:
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        names.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.add(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # noqa: BLE001 - end of the pickles, or raw bytes after them
        pass
    return names


def _load(path, what: str = "checkpoint"):
    """torch.load with weights_only=True: tensors and plain data only, never code.

    A file that needs more (classes, functions) is refused with one line that says whether it is
    an older file of this tool (convert it) or something else (nothing was executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter of the safe unpickler
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = _pickle_globals(path)
        if unsafe and all(_ours(name) for name in unsafe):
            raise CheckpointError(
                f"{what} {path} was written by an older version of this tool (it holds pickled "
                f"objects); convert it once with `python -m utils.checkpoint convert {path} "
                f"NEW.pth` (only for files you trust)") from None
        shown = ", ".join(sorted(unsafe)[:3]) or "non-tensor objects"
        raise CheckpointError(f"{what} {path} refused: loading it would run code ({shown}); "
                              "nothing was executed: use only files written by this tool") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            AttributeError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{what} {path} cannot be read ({first[:160]}); it is truncated "
                              "or not a checkpoint of this tool: delete it or pass another") from None


def read_tensors_file(path):
    """Any file of tensors and plain data (a state_dict, a checkpoint), read safely."""
    return _load(path, "weights file")


def load_checkpoint(path) -> dict:
    ckpt = _load(path)
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


# ----------------------------------------------------------------------------- pruned models

_PLAIN = (type(None), bool, int, float, str)


def _plain_value(value):
    """`value` as plain data (None, bool, int, float, str, tuples/lists of them), else None + False."""
    if isinstance(value, _PLAIN):
        return value, True
    if isinstance(value, (tuple, list)):
        items = [_plain_value(v) for v in value]
        if all(ok for _, ok in items):
            return (list if isinstance(value, list) else tuple)(v for v, _ in items), True
    return None, False


def _plain_meta(obj):
    """Metadata as data the safe loader accepts: numpy scalars/arrays, paths... become plain."""
    if isinstance(obj, (torch.Tensor,) + _PLAIN):
        return obj
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, _PLAIN) else k: _plain_meta(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (tuple if isinstance(obj, tuple) else list)(_plain_meta(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return _plain_meta(vars(obj))
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist) and type(obj).__module__.startswith("numpy"):
        return _plain_meta(tolist())
    return str(obj)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str, extra_modules: Sequence[str] = ()) -> type:
    """The nn.Module class `module:qualname`, looked up only inside the allowed packages."""
    module_name, _, qualname = str(name).partition(":")
    allowed = tuple(SAFE_MODULES) + tuple(extra_modules)

    def inside(module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in allowed)

    if not qualname or "__" in qualname or not inside(module_name):
        raise CheckpointError(f"class {name} is outside the packages a pruned model may use "
                              f"({', '.join(allowed)})")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise CheckpointError(f"class {name} does not exist in this version of the code") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and inside(obj.__module__)):
        raise CheckpointError(f"{name} is not an nn.Module class of the allowed packages")
    return obj


def _structure(model: nn.Module, extra_modules: Sequence[str]):
    """(structure, extra tensors) describing every module of `model`, without pickling code."""
    paths = {}
    for path, module in model.named_modules():
        paths.setdefault(id(module), path)
    structure, extra = {}, {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        cls = type(module)
        name = _class_name(cls)
        try:
            if _resolve_class(name, extra_modules) is not cls:
                raise CheckpointError(f"class {name} is shadowed")
        except CheckpointError as err:
            raise CheckpointError(f"cannot save module '{path or 'the root'}' safely: {err}; "
                                  "build the network from models/, torch.nn or torchvision classes"
                                  ) from None
        attrs, tensor_attrs = {}, []
        for key, value in module.__dict__.items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor):
                tensor_attrs.append(key)
                extra[prefix + key] = value.detach().cpu()
                continue
            plain, ok = _plain_value(value)
            if ok:
                attrs[key] = plain
        non_persistent = module._non_persistent_buffers_set
        for key in non_persistent:
            if module._buffers.get(key) is not None:
                extra[prefix + key] = module._buffers[key].detach().cpu()
        structure[path] = {
            "class": name,
            "attrs": attrs,
            "tensor_attrs": tensor_attrs,
            "params": {k: None if p is None else bool(p.requires_grad)
                       for k, p in module._parameters.items()},
            "buffers": {k: None if b is None else k not in non_persistent
                        for k, b in module._buffers.items()},
            "children": [[k, None if c is None else paths[id(c)]] for k, c in module._modules.items()],
        }
    return structure, extra


def save_pruned_model(model: nn.Module, path, /, extra_modules: Sequence[str] = (), **meta) -> None:
    """A (pruned) network as its structure + state_dict + metadata; `load_pruned_model` rebuilds it.

    meta 'arch', 'num_classes' and optional 'model_kwargs' name the `models.get_model` network the
    pruned one came from: the loader starts from that skeleton so that attributes which are not
    plain data (e.g. torchvision's norm_layer factories) exist as in a freshly built network.
    (`model` and `path` are positional-only, so `meta` may carry a `model=` name.)"""
    structure, extra = _structure(model, extra_modules)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"format": PRUNED_FORMAT, "kind": "pruned_model", "structure": structure,
                 "state_dict": state, "extra": extra, "meta": _plain_meta(meta)}, path)


def _blank(cls: type) -> nn.Module:
    """An instance of `cls` with nn.Module's bookkeeping only; its own __init__ is not run."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def _skeleton(meta: dict) -> Optional[nn.Module]:
    """The dense network named in `meta`, on the meta device (no memory, no init), or None."""
    arch, num_classes = meta.get("arch"), meta.get("num_classes")
    if not isinstance(arch, str) or not isinstance(num_classes, int):
        return None
    kwargs = meta.get("model_kwargs") or {}
    try:
        from models import get_model
        with torch.device("meta"):
            return get_model(arch, num_classes, **kwargs)
    except Exception:  # noqa: BLE001 - only a hint: without it every module is built from records
        return None


def _rebuild(structure: dict, state: dict, extra: dict, skeleton: Optional[nn.Module],
             extra_modules: Sequence[str]) -> nn.Module:
    built: Dict[str, nn.Module] = {}

    def build(path: str, existing: Optional[nn.Module]) -> nn.Module:
        if path in built:  # a module shared by several parents
            return built[path]
        if path not in structure:
            raise CheckpointError(f"module '{path}' is missing from the file's structure")
        record = structure[path]
        cls = _resolve_class(record["class"], extra_modules)
        module = existing if type(existing) is cls else _blank(cls)
        built[path] = module
        prefix = f"{path}." if path else ""
        for key, value in record["attrs"].items():
            if not _plain_value(value)[1] or key.startswith("__"):
                raise CheckpointError(f"attribute {key} of module '{path}' is not plain data")
            module.__dict__[key] = value
        for key in record["tensor_attrs"]:
            module.__dict__[key] = extra[prefix + key].clone()
        module._parameters = {}
        for key, grad in record["params"].items():
            module.__dict__.pop(key, None)
            module._parameters[key] = None if grad is None else nn.Parameter(
                torch.empty_like(state[prefix + key]), requires_grad=grad)
        module._buffers = {}
        for key, persistent in record["buffers"].items():
            module.__dict__.pop(key, None)
            source = state if persistent else extra
            module._buffers[key] = None if persistent is None else torch.empty_like(source[prefix + key])
        module._non_persistent_buffers_set = {k for k, p in record["buffers"].items() if p is False}
        old_children = module._modules if module is existing else {}
        module._modules = {}
        for key, child_path in record["children"]:
            module.__dict__.pop(key, None)
            module._modules[key] = None if child_path is None else build(
                child_path, old_children.get(key))
        return module

    model = build("", skeleton)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        for name, tensor in extra.items():
            owner, _, key = name.rpartition(".")
            module = model.get_submodule(owner)
            if key in module._buffers:
                module._buffers[key].copy_(tensor)
    return model


def load_pruned_model(path, device="cpu", with_meta: bool = False,
                      extra_modules: Sequence[str] = ()):
    """Load a network written by train_prune.py / iterative_prune.py (pruned_model.pth), in eval mode.

    >>> from utils.checkpoint import load_pruned_model
    >>> model = load_pruned_model("outputs/.../pruned_model.pth")

    extra_modules: further packages whose nn.Module classes the file may name (SAFE_MODULES always).
    """
    obj = _load(path, "pruned model")
    if not isinstance(obj, dict) or obj.get("kind") != "pruned_model" or "structure" not in obj:
        raise CheckpointError(f"{path} is not a pruned model written by this tool; pass a "
                              "pruned_model.pth from an output folder")
    meta = obj.get("meta", {})
    try:
        model = _rebuild(obj["structure"], obj["state_dict"], obj.get("extra", {}),
                         _skeleton(meta), extra_modules)
    except CheckpointError as err:
        raise CheckpointError(f"pruned model {path} cannot be rebuilt: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"pruned model {path} is damaged ({type(err).__name__}: "
                              f"{first[:120]}); write it again") from None
    model = model.to(device).eval()
    return (model, meta) if with_meta else model


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


# ----------------------------------------------------------------------------- conversion

def _plain_tensors(obj):
    """A checkpoint's contents with numpy arrays as tensors and namespaces as dicts."""
    if isinstance(obj, dict):  # OrderedDict / Counter (state_dicts, schedulers) are allowed types
        return type(obj)((k, _plain_tensors(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_plain_tensors(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return _plain_tensors(vars(obj))
    if type(obj).__module__ == "numpy":
        import numpy as np
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def convert(old, new) -> str:
    """Rewrite a file of an older version in the safe format. It UNPICKLES `old` (may run code):
    the one place that does, on the user's explicit request, for files they trust."""
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise CheckpointError(f"{old} does not exist; check the path")
    try:
        obj = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure of an old file is one line
        raise CheckpointError(f"{old} cannot be read ({type(err).__name__}); it is not a "
                              "checkpoint of this tool") from None
    if isinstance(obj, dict) and obj.get("kind") == "pruned_model" and \
            isinstance(obj.get("model"), nn.Module):
        save_pruned_model(obj["model"], new, **obj.get("meta", {}))
        load_pruned_model(new)
        return "pruned model"
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        save_atomic(_plain_tensors(obj), new)
        load_checkpoint(new)
        return "checkpoint"
    raise CheckpointError(f"{old} is not a pruned model or checkpoint of this tool; nothing written")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.checkpoint",
        description="Convert a pruned model or checkpoint written by an older version (pickled "
                    "modules) to the safe format. This unpickles OLD: only for files you trust.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite OLD as NEW in the safe format")
    c.add_argument("old")
    c.add_argument("new")
    args = parser.parse_args(argv)
    kind = convert(args.old, args.new)
    print(f"wrote {args.new} ({kind}, safe format)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/, pruners/ by name
    from utils.checkpoint import main as _main  # the importable module's CheckpointError
    from utils.cli import run_main
    run_main(_main)

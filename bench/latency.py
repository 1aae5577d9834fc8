"""Inference latency of pruned networks against their dense network, on CPU and CUDA.

    python bench/latency.py --grid outputs/grid                  # every finished cell of a grid
    python bench/latency.py --models a/pruned_model.pth b/pruned_model.pth --dense resnet56
    python bench/latency.py --grid outputs/grid --devices cpu --batch_sizes 1 --threads 4

Variants: the dense network and every pruned one. `--grid`: the grid runner's results.json; each
finished cell's `pruned_model.pth` lies beside its `result_path`, and the dense checkpoint is the
one its pruning run used (`<save_path_prefix>/<dataset>_<model>.pth`, or --pretrained). `--models`:
pruned_model.pth files; `--dense`: an architecture name or a checkpoint (default: the
architecture the first pruned model came from). Without a dense checkpoint the dense network gets
random weights: latency does not depend on their values.

Every variant runs in eval mode under torch.inference_mode on a random batch of the dataset's
resolution, for each of --devices (cuda is skipped with a note when there is no GPU) and
--batch_sizes: --warmup untimed forwards, then the median of --repeats timed ones (CUDA events
and a synchronize on a GPU, time.perf_counter on the CPU). Prints a Markdown table (MACs for one
image, multiply-accumulates) and writes the rows to --json (default `<grid>/latency.json`), the
file `python -m utils.plots` draws latency against MACs from.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.imagenet_throughput import Timer  # noqa: E402
from models import get_model  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import (load_checkpoint, load_pruned_model, load_state_into,  # noqa: E402
                              read_tensors_file, write_json)
from utils.data import get_dataset_info  # noqa: E402
from utils.flops import count_macs, count_params, format_count  # noqa: E402
from utils.plots import PlotError, finished, load_rows  # noqa: E402


@dataclass
class Variant:
    name: str
    load: Callable[[], nn.Module]
    criterion: Optional[str] = None
    target: Optional[float] = None
    seed: Optional[int] = None


@dataclass
class Setup:
    """What the dense network and the inputs need, gathered from the files."""
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    model_kwargs: dict = field(default_factory=dict)
    dataset: Optional[str] = None
    image_size: Optional[int] = None
    dense_checkpoint: Optional[Path] = None


def parse(argv=None) -> argparse.Namespace:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--grid", default=None, help="a grid runner's folder (its results.json)")
    p.add_argument("--models", nargs="+", default=[], metavar="PRUNED_MODEL",
                   help="pruned_model.pth files")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="with --grid: time only these seeds' cells (pruned shapes barely "
                        "depend on the seed; default: every cell)")
    p.add_argument("--dense", default=None,
                   help="architecture name or dense checkpoint (default: from the pruned models)")
    p.add_argument("--dataset", default=None,
                   help="sets the input resolution when the files do not say (e.g. cifar10)")
    p.add_argument("--image_size", type=int, default=None, help="input resolution (overrides)")
    p.add_argument("--num_classes", type=int, default=None,
                   help="classes of a dense network given by name (default: the pruned models')")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cpu, cuda, cuda:N")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=50, help="timed forwards (median reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed forwards before timing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default=None, help="rows written here (default: <grid>/latency.json)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if not args.grid and not args.models:
        raise cli.UsageError("nothing to measure; pass --grid <grid_dir> and/or --models "
                             "<pruned_model.pth ...>")
    for flag, least in (("batch_sizes", 1), ("repeats", 1), ("warmup", 0), ("threads", 1),
                        ("image_size", 8), ("num_classes", 1)):
        values = getattr(args, flag)
        for v in values if isinstance(values, list) else [values]:
            if v is not None and v < least:
                raise cli.UsageError(f"--{flag} must be at least {least}, got {v}")
    return args


# ----------------------------------------------------------------------------- variants

def _pruned_loader(path: Path) -> Callable[[], nn.Module]:
    return lambda: load_pruned_model(path)


def _resolve(path, base: Path) -> Path:
    """A path as written (relative to the current folder), else relative to `base`."""
    path = Path(path)
    return path if path.exists() or path.is_absolute() else base / path


def _learn(setup: Setup, meta: dict) -> None:
    """Fill what `setup` lacks from a pruned model's meta (and its results record)."""
    results = meta.get("results") or {}
    settings = results.get("settings") or {}
    setup.arch = setup.arch or meta.get("arch")
    setup.num_classes = setup.num_classes or meta.get("num_classes")
    setup.model_kwargs = setup.model_kwargs or dict(meta.get("model_kwargs") or {})
    setup.dataset = setup.dataset or results.get("dataset")
    setup.image_size = (setup.image_size or setup.model_kwargs.get("image_size")
                        or settings.get("image_size"))
    if setup.dense_checkpoint is None and settings.get("model"):
        setup.dense_checkpoint = _dense_checkpoint(settings)


def _dense_checkpoint(settings: dict) -> Optional[Path]:
    """The dense checkpoint a pruning run started from (pruners.workflow.dense_paths)."""
    from pruners.workflow import dense_paths
    try:
        final, _ = dense_paths(argparse.Namespace(
            save_path_prefix=settings.get("save_path_prefix") or "checkpoints",
            dataset=settings.get("dataset"), model=settings.get("model"),
            pretrained=settings.get("pretrained"), sparsity_l1=settings.get("sparsity_l1") or 0.0))
    except (TypeError, ValueError):
        return None
    return final


def grid_variants(grid: Path, setup: Setup, seeds: Optional[List[int]] = None) -> List[Variant]:
    variants = []
    for cell in finished(load_rows(grid)):
        if seeds is not None and cell.get("seed") not in seeds:
            continue
        where = cell.get("result_path")
        path = _resolve(where, grid).parent / "pruned_model.pth" if where else None
        if path is None or not path.is_file():
            print(f"note: no pruned_model.pth for cell {cell.get('criterion')} target "
                  f"{cell.get('target')} seed {cell.get('seed')} (result_path {where}); skipped")
            continue
        if setup.arch is None:
            _, meta = load_pruned_model(path, with_meta=True)
            _learn(setup, meta)
            if setup.dense_checkpoint is not None:
                setup.dense_checkpoint = _resolve(setup.dense_checkpoint, grid.parent)
        setup.dataset = setup.dataset or cell.get("dataset")
        target = cell.get("target")
        shown = f"{target:g}" if isinstance(target, (int, float)) else target
        variants.append(Variant(f"{cell.get('criterion')} {shown} s{cell.get('seed')}",
                                _pruned_loader(path), cell.get("criterion"), target,
                                cell.get("seed")))
    return variants


def file_variants(paths: List[str], setup: Setup) -> List[Variant]:
    variants = []
    for p in paths:
        path = Path(p)
        _, meta = load_pruned_model(path, with_meta=True)  # a one-line error for a bad file
        _learn(setup, meta)
        results = meta.get("results") or {}
        crit, target, seed = (results.get("importance_type"), results.get("target_ops_ratio"),
                              results.get("seed"))
        name = (f"{crit} {target:g} s{seed}" if crit and isinstance(target, (int, float))
                else f"{path.parent.name}/{path.stem}")
        variants.append(Variant(name, _pruned_loader(path), crit, target, seed))
    return variants


def dense_variant(args, setup: Setup) -> Variant:
    """The dense network: --dense (checkpoint or name), else the grid's dense checkpoint, else
    the pruned models' architecture with random weights."""
    given = args.dense
    if given and Path(given).is_file():
        obj = read_tensors_file(given)
        if isinstance(obj, dict) and obj.get("kind") == "pruned_model":
            _, meta = load_pruned_model(given, with_meta=True)
            _learn(setup, meta)
            return Variant("dense", _pruned_loader(Path(given)))
        ckpt = load_checkpoint(given)
        setup.arch, setup.dense_checkpoint = ckpt.get("arch") or setup.arch, Path(given)
        setup.num_classes = ckpt.get("num_classes") or setup.num_classes
        setup.dataset = setup.dataset or ckpt.get("dataset")
    elif given:
        setup.arch = given
        setup.dense_checkpoint = None
    if not setup.arch:
        raise cli.UsageError("the dense architecture is unknown; pass --dense <arch name or "
                             "checkpoint>")
    if not setup.num_classes:
        if not setup.dataset:
            raise cli.UsageError("the number of classes is unknown; pass --num_classes or --dataset")
        setup.num_classes = get_dataset_info(setup.dataset).num_classes
    arch, classes, kwargs, ckpt = setup.arch, setup.num_classes, setup.model_kwargs, setup.dense_checkpoint

    def load() -> nn.Module:
        model = get_model(arch, classes, **kwargs)
        if ckpt is not None and ckpt.is_file():
            load_state_into(model, load_checkpoint(ckpt)["state_dict"], ckpt, arch)
        return model.eval()

    if ckpt is None or not ckpt.is_file():
        print(f"note: no dense checkpoint{f' at {ckpt}' if ckpt else ''}; the dense {arch} gets "
              "random weights (latency does not depend on them)")
    return Variant("dense", load)


def input_shape(args, setup: Setup) -> tuple:
    size = args.image_size or setup.image_size
    dataset = args.dataset or setup.dataset
    if not size and dataset:
        size = get_dataset_info(dataset).image_size
    if not size:
        raise cli.UsageError("the input resolution is unknown; pass --dataset or --image_size")
    return (3, int(size), int(size))


# ----------------------------------------------------------------------------- timing

def usable_devices(names: List[str]) -> List[torch.device]:
    devices = []
    for name in names:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"note: {name} skipped: no CUDA GPU is available")
            continue
        devices.append(cli.resolve_device(name))
    if not devices:
        raise cli.UsageError("none of --devices is available here; pass --devices cpu")
    return devices


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@torch.inference_mode()
def median_ms(model: nn.Module, device: torch.device, batch: int, shape: tuple, repeats: int,
              warmup: int) -> float:
    """Median milliseconds of one eval-mode forward of a `batch` of random inputs."""
    x = torch.randn(batch, *shape, device=device)
    timer = Timer(device)
    for _ in range(warmup):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000.0 * statistics.median(timer(lambda: model(x)) for _ in range(repeats))


def measure(variants: List[Variant], devices, args, shape, setup: Setup) -> List[dict]:
    from tqdm import tqdm

    rows = []
    example = torch.zeros(1, *shape)
    for v in tqdm(variants, desc="latency", disable=not args.progress):
        model = v.load().eval()
        macs, params = count_macs(model, example), count_params(model)
        for device in devices:
            model.to(device)
            for batch in args.batch_sizes:
                try:
                    ms = median_ms(model, device, batch, shape, args.repeats, args.warmup)
                except torch.cuda.OutOfMemoryError:
                    print(f"note: {v.name} batch {batch} does not fit on {device}; skipped")
                    torch.cuda.empty_cache()
                    continue
                rows.append({"variant": v.name, "criterion": v.criterion, "target": v.target,
                             "seed": v.seed, "device": str(device), "batch_size": batch,
                             "macs": macs, "params": params, "median_ms": ms,
                             "images_per_s": 1000.0 * batch / ms, "device_name": device_name(device),
                             "model": setup.arch, "dataset": setup.dataset,
                             "repeats": args.repeats, "threads": torch.get_num_threads()})
        del model
        for device in devices:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:  # speed-up against the dense network at the same device and batch
        dense = next((d for d in rows if d["variant"] == "dense" and d["device"] == r["device"]
                      and d["batch_size"] == r["batch_size"]), None)
        r["speedup"] = dense["median_ms"] / r["median_ms"] if dense else None
    return rows


def table(rows: List[dict]) -> str:
    lines = ["| variant | device | batch | MACs | params | median ms | images/s | speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["device"], r["batch_size"])):
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "—"
        lines.append(f"| {r['variant']} | {r['device']} | {r['batch_size']} | "
                     f"{format_count(r['macs'])} | {format_count(r['params'])} | "
                     f"{r['median_ms']:.3f} | {r['images_per_s']:.1f} | {speedup} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = usable_devices(args.devices)
    if any(d.type == "cuda" for d in devices):
        torch.backends.cudnn.benchmark = True  # the fastest kernels for each pruned shape
    setup = Setup()
    try:
        variants = file_variants(args.models, setup)
        if args.grid:
            variants += grid_variants(Path(args.grid), setup, args.seeds)
    except PlotError as err:
        raise cli.UsageError(str(err)) from None
    if not variants:
        raise cli.UsageError(f"no pruned model to measure in {args.grid}; run the grid first or "
                             "pass --models")
    variants.insert(0, dense_variant(args, setup))
    shape = input_shape(args, setup)
    rows = measure(variants, devices, args, shape, setup)
    print(f"\n{setup.arch}, input {'x'.join(map(str, shape))}, median of {args.repeats} forwards "
          f"after {args.warmup} warm-up, {torch.get_num_threads()} CPU threads; "
          + ", ".join(f"{d}: {device_name(d)}" for d in devices) + "; MACs per image\n")
    print(table(rows))
    out = args.json or (Path(args.grid) / "latency.json" if args.grid else None)
    if out:
        write_json(rows, out)
        print(f"\nrows written to {out}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)

"""The steps of train_imagenet.py: load the network to fine-tune, build this process's loaders,
fine-tune with the one training loop (utils.engine), save the result and its record.

Files, all under --save_dir:
  <name>.pth            the network to fine-tune (utils.checkpoint.save_pruned_model format)
  <name>_newest.pth     per-epoch resumable checkpoint (atomic; --resume continues from it)
  <name>_finetuned.pth  the fine-tuned network (pruned-model format: load_pruned_model)
  <name>_finetuned.json test loss / top-1 / top-5 per epoch, settings, world size, seconds
  <name>_tb/            TensorBoard scalars
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from . import distributed as dist_utils
from .checkpoint import (CheckpointError, check_writable, load_checkpoint, load_pruned_model,
                         save_pruned_model, write_json)
from .cli import UsageError, settings, train_config
from .data import Loaders, build_loaders, shard_loaders
from .engine import evaluate_metrics, seed_everything, train, use_deterministic_algorithms


@dataclass
class Paths:
    source: Path
    newest: Path
    final: Path
    record: Path
    tensorboard: Path


def paths(save_dir, model_name: str) -> Paths:
    name = model_name[:-4] if model_name.endswith(".pth") else model_name
    d = Path(save_dir)
    return Paths(d / f"{name}.pth", d / f"{name}_newest.pth", d / f"{name}_finetuned.pth",
                 d / f"{name}_finetuned.json", d / f"{name}_tb")


def check_args(args, device: torch.device) -> None:
    """What can be checked before loading anything (so bad input costs nothing)."""
    train_config(args).check(device, has_val=False)  # the recipe's own checks, up front
    if args.sync_bn and dist_utils.is_distributed() and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel); drop it")
    # counts (--epochs, --batch-size, --workers, --stop_after_epochs) are checked by cli.parse


def load_network(args, p: Paths):
    """(model, meta): the saved (pruned) network, or a dense torchvision one for --model."""
    if p.source.exists():
        model, meta = load_pruned_model(p.source, with_meta=True)
        return model, dict(meta), str(p.source)
    if not args.model:
        raise UsageError(f"model file {p.source} does not exist; check --save_dir/--model_name, "
                         "or pass --model <torchvision name> to fine-tune a dense network")
    return None, {"arch": args.model}, None


def load_data(args, meta: dict, device: torch.device) -> Loaders:
    """This process's loaders: the whole training folder (no held-out split: there is no
    checkpoint selection) and the val folder as the reported test set, sharded over processes."""
    dataset = args.dataset or meta.get("dataset") or "imagenet"
    image_size = args.image_size or meta.get("image_size") or 224
    loaders = build_loaders(dataset, data_root=args.data_root, batch_size=args.batch_size,
                            eval_batch_size=args.eval_batch_size, num_workers=args.workers,
                            val_fraction=0.0, seed=args.seed,
                            pin_memory=device.type == "cuda",
                            image_size=image_size if dataset == "imagenet" else None,
                            auto_augment=None if args.auto_augment == "none" else args.auto_augment)
    return shard_loaders(loaders, seed=args.seed)


def check_fits(model: nn.Module, loaders: Loaders, where: str) -> None:
    """One forward pass on an input of the data's shape: the network must accept it and output
    one score per class of the data."""
    x = loaders.example_inputs(2, device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, AssertionError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"{where} does not accept {tuple(x.shape[1:])} inputs ({first}); pass the "
                         "--image_size it was built for") from None
    finally:
        model.train(was)
    if out.ndim != 2 or out.shape[1] != loaders.num_classes:
        raise UsageError(f"{where} outputs {tuple(out.shape[1:])} scores but the data has "
                         f"{loaders.num_classes} classes; pass the matching --dataset/--data_root")


def check_resumable(args, p: Paths, arch: str) -> None:
    if not args.resume:
        return
    if not p.newest.exists():
        raise CheckpointError(f"nothing to resume: {p.newest} does not exist; run without --resume")
    ckpt = load_checkpoint(p.newest)
    if ckpt.get("arch") not in (None, arch):
        raise CheckpointError(f"checkpoint {p.newest} belongs to '{ckpt.get('arch')}', not '{arch}'; "
                              "pass the matching --model_name or run without --resume")


def run(args) -> int:
    if getattr(args, "deterministic", False):
        use_deterministic_algorithms()  # before any CUDA work
    return _run(args, dist_utils.init_distributed(args.device))


def _say(msg: str) -> None:
    if dist_utils.is_main():
        print(msg, flush=True)


def _run(args, info) -> int:
    device = info.device
    check_args(args, device)
    p = paths(args.save_dir, args.model_name)
    dist_utils.agreed(lambda: check_writable(p.newest.parent, flag="--save_dir"))
    seed_everything(args.seed)  # the same initial weights on every process
    model, meta, source = load_network(args, p)
    loaders = load_data(args, meta, device)
    if model is None:
        from models import get_model
        model = get_model(args.model, loaders.num_classes, weights=args.weights)
        source = f"torchvision {args.model}" + (f" ({args.weights})" if args.weights else "")
    arch = meta.get("arch") or type(model).__name__
    model.to(device)
    check_fits(model, loaders, source if source.startswith("torchvision") else f"model {source}")
    check_resumable(args, p, arch)
    if args.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    seed_everything(args.seed + info.rank)  # MixUp/CutMix/dropout draws differ per process

    if args.test_only:
        m = evaluate_metrics(model, loaders.test, device, progress=args.progress, amp=args.amp)
        _say(f"test ({m['count']} images): loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  "
             f"top-5 {m['top5']:.2f}%")
        return 0

    cfg = train_config(args, select="last")
    t0 = time.perf_counter()
    result = train(model, loaders, cfg, device, p.newest, resume=args.resume,
                   log_dir=p.tensorboard if args.tensorboard else None, progress=args.progress,
                   desc=f"fine-tune {Path(args.model_name).stem}",
                   meta={"arch": arch, "source": source}, monitor=loaders.test,
                   stop_after=args.stop_after_epochs)
    if not result.finished:
        _say(f"stopped after epoch {result.history[-1]['epoch'] if result.history else 0} of "
             f"{cfg.epochs}; continue with --resume")
        return 0
    final = result.ema.module if result.ema is not None else model
    m = evaluate_metrics(final, loaders.test, device, amp=args.amp)
    record = {
        "model_name": args.model_name, "source": source, "arch": arch,
        "dataset": loaders.info.name, "image_size": loaders.image_size,
        "num_classes": loaders.num_classes, "world_size": info.world_size,
        "global_batch_size": args.batch_size * info.world_size, "epochs": cfg.epochs,
        "final_weights": "ema" if result.ema is not None else "last epoch",
        "test_loss": m["loss"], "test_top1": m["top1"], "test_top5": m["top5"],
        "test_images": m["count"], "seconds": time.perf_counter() - t0,
        "history": result.history,
        "settings": settings(args),
    }
    if info.is_main:
        to_save = final.module if isinstance(final, nn.parallel.DistributedDataParallel) else final
        save_pruned_model(to_save, p.final, **{**meta, "finetune": {
            k: record[k] for k in ("test_top1", "test_top5", "test_loss", "epochs", "world_size")},
            "image_size": loaders.image_size, "num_classes": loaders.num_classes,
            "dataset": loaders.info.name})
        write_json(record, p.record)
    dist_utils.barrier()
    _say(f"fine-tuned {arch}: test loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%  "
         f"top-5 {m['top5']:.2f}%  ({info.world_size} process(es), {record['seconds']:.0f}s) "
         f"-> {p.final}")
    return 0

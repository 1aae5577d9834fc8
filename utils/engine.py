"""The one training loop and the one evaluation loop.

`train()` runs SGD with a multi-step schedule, keeps the state with the best validation accuracy,
writes a resumable checkpoint atomically after every epoch, and, with `resume=True`, continues an
interrupted run exactly where it stopped (model, optimiser, schedule and every RNG state restored,
so the final metrics equal those of an uninterrupted run on the same device).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _rng_state(loader) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    gen = getattr(loader, "generator", None)
    if gen is not None:
        state["loader"] = gen.get_state()
    return state


def _set_rng_state(state: dict, loader) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen = getattr(loader, "generator", None)
    if gen is not None and "loader" in state:
        gen.set_state(state["loader"])


@dataclass
class TrainConfig:
    epochs: int
    lr: float
    milestones: List[int]
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    # Extra loss term on the model (NN Slimming's L1 penalty on BatchNorm scales), or None.
    regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None


@dataclass
class TrainResult:
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: List[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, progress: bool = False, desc: str = "eval"):
    """(mean loss, accuracy in %) of `model` on `loader`; restores the train/eval flag."""
    was = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        total_loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    model.train(was)
    if count == 0:
        return float("nan"), float("nan")
    return total_loss / count, 100.0 * correct / count


@torch.no_grad()
def evaluate_metrics(model: nn.Module, loader, device, progress: bool = False,
                     desc: str = "eval") -> dict:
    """{'loss', 'top1', 'top5' (in %), 'count'} of `model` on `loader`. Under torchrun each process
    passes its own shard and the sums are added over processes, so the figures are exact."""
    from .distributed import all_reduce_sum
    was = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1 hits, top-5 hits, count
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        k = min(5, out.shape[1])
        hits = out.topk(k, dim=1).indices.eq(y[:, None])
        sums += torch.tensor([F.cross_entropy(out, y, reduction="sum").item(),
                              hits[:, 0].sum().item(), hits.any(1).sum().item(), y.numel()],
                             dtype=torch.float64)
    model.train(was)
    loss, top1, top5, count = all_reduce_sum(sums).tolist()
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "count": 0}
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "count": int(count)}


def _open_writer(log_dir: Optional[Path]):
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _cpu_state(model: nn.Module) -> dict:
    """A CPU copy of the model's state, safe from later in-place updates."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(model: nn.Module, loaders, cfg: TrainConfig, device, checkpoint_path: Path,
          resume: bool = False, log_dir: Optional[Path] = None, progress: bool = True,
          desc: str = "train", meta: Optional[dict] = None) -> TrainResult:
    """Train `model` in place; at the end it holds the best-validation weights.

    checkpoint_path: the per-epoch resumable checkpoint (written atomically).
    meta: extra fields stored in the checkpoint (architecture name, class count, ...).
    """
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones,
                                                     gamma=cfg.gamma)
    start_epoch, best_acc, best_epoch = 0, -1.0, -1
    best_state = None
    history: List[dict] = []
    if resume and Path(checkpoint_path).exists():
        ckpt = load_checkpoint(checkpoint_path)
        try:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError):
            raise CheckpointError(f"checkpoint {checkpoint_path} does not match this run's model; "
                                  "delete it or run without --resume") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = ckpt["epoch"]
        best_acc, best_epoch = ckpt["best_val_acc"], ckpt["best_epoch"]
        best_state = ckpt["best_state"]
        history = ckpt.get("history", [])
        _set_rng_state(ckpt["rng"], loaders.train)
    elif loaders.val is not None:
        # The starting point competes too: fine-tuning never hands back a network that is worse
        # on the validation split than the one it was given.
        best_acc = evaluate(model, loaders.val, device)[1]
        best_epoch = 0
        best_state = _cpu_state(model)
    writer = _open_writer(log_dir)
    t0 = time.perf_counter()
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=desc, initial=start_epoch, total=cfg.epochs,
                  disable=not progress, unit="epoch")
    try:
        for epoch in epochs:
            model.train()
            run_loss, run_correct, run_count = 0.0, 0, 0
            for x, y in tqdm(loaders.train, desc=f"epoch {epoch + 1}", leave=False,
                             disable=not progress):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss = F.cross_entropy(out, y)
                total = loss + cfg.regularizer(model) if cfg.regularizer is not None else loss
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"training loss became {loss.item()} at epoch "
                                             f"{epoch + 1}; lower the learning rate")
                run_loss += loss.item() * y.numel()
                run_correct += (out.argmax(1) == y).sum().item()
                run_count += y.numel()
            scheduler.step()
            val_loss, val_acc = evaluate(model, loaders.val, device)
            record = {"epoch": epoch + 1, "train_loss": run_loss / max(run_count, 1),
                      "train_acc": 100.0 * run_correct / max(run_count, 1),
                      "val_loss": val_loss, "val_acc": val_acc,
                      "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch + 1
                best_state = _cpu_state(model)
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(f"{desc}/{k}", v, epoch + 1)
            epochs.set_postfix(val_acc=f"{val_acc:.2f}", best=f"{best_acc:.2f}")
            save_atomic({"format": FORMAT, "kind": "training", **(meta or {}),
                         "epoch": epoch + 1, "state_dict": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_val_acc": best_acc, "best_epoch": best_epoch,
                         "best_state": best_state, "history": history,
                         "rng": _rng_state(loaders.train)}, checkpoint_path)
    finally:
        if writer is not None:
            writer.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(best_acc, best_epoch, cfg.epochs - start_epoch,
                       time.perf_counter() - t0, history)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, device) -> int:
    """Re-estimate every BatchNorm's running statistics from `batches` (a plain average over them),
    without touching any weight. Pruning changes what each BatchNorm sees, and stale running
    statistics alone can take a pruned network to chance accuracy in eval mode.
    Returns the number of batches used (0: the model has no BatchNorm, nothing done)."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    used = 0
    try:
        for x, _ in batches:
            model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was)
    return used

"""The one training loop and the one evaluation loop, for one process or many (torchrun + DDP).

`train()` runs the recipe a `TrainConfig` describes — by default SGD with momentum, a multi-step
schedule and selection of the epoch with the best validation accuracy; optionally AdamW, step or
cosine schedules after a linear warm-up, label smoothing, MixUp/CutMix, gradient clipping, CUDA
mixed precision and an EMA of the weights (the options of torchvision's classification
reference). It writes a resumable checkpoint atomically after every epoch and, with
`resume=True`, continues an interrupted run exactly where it stopped (model, optimiser,
schedule, grad scaler, EMA and every process's RNG states), so the final metrics equal those of
an uninterrupted run on the same device.

Under torchrun (`utils.distributed.is_distributed()`) the model is wrapped in
DistributedDataParallel, the train sampler gets `set_epoch`, metrics are summed over all
processes (exact, every sample counted once when loaders are sharded without padding, see
`utils.data.shard_loaders`), and only rank 0 writes checkpoints, TensorBoard and progress bars.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic
from .log import RunFailure, warn_once


class TrainConfigError(ValueError):
    """A training option that cannot work as given; one line naming the flag."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def use_deterministic_algorithms() -> None:
    """--deterministic: reproducible runs on CUDA too, as far as PyTorch allows. Deterministic
    kernels (an op without one warns instead of stopping the run), cuDNN without autotuning, and
    the cuBLAS workspace setting its deterministic mode needs; call it before any CUDA work (the
    cuBLAS setting is read when its first handle is made). The CPU is deterministic without it."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _numpy_state() -> tuple:
    """numpy's global RNG state with its key as a tensor: checkpoints hold only tensors and plain
    data, so they load with weights_only=True."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _set_numpy_state(state) -> None:
    name, key, pos, has_gauss, cached = state
    key = key.numpy() if isinstance(key, torch.Tensor) else key  # ndarray: an older checkpoint
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))


def _rng_state(loader) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    gen = getattr(loader, "generator", None)
    if gen is not None:
        state["loader"] = gen.get_state()
    return state


def _set_rng_state(state: dict, loader) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU seen when saving; a resumed run may see fewer (another
        # CUDA_VISIBLE_DEVICES), so restore those it has.
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    gen = getattr(loader, "generator", None)
    if gen is not None and "loader" in state:
        gen.set_state(state["loader"])


OPTIMIZERS = ("sgd", "adamw")
NAN_POLICIES = ("stop", "skip_batch")
LR_SCHEDULERS = ("multisteplr", "steplr", "cosineannealinglr")
WARMUP_METHODS = ("linear", "constant")


@dataclass
class TrainConfig:
    """A training recipe. The defaults are the CIFAR recipe of the scripts (SGD with momentum,
    multi-step lr, best-on-validation selection); the other fields follow torchvision's
    classification reference (`references/classification/train.py`)."""
    epochs: int
    lr: float
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    # Extra loss term on the model (NN Slimming's L1 penalty on BatchNorm scales), or None.
    regularizer: Optional[Callable[[nn.Module], torch.Tensor]] = None
    optimizer: str = "sgd"                 # sgd | adamw
    lr_scheduler: str = "multisteplr"      # multisteplr (milestones) | steplr | cosineannealinglr
    lr_step_size: int = 30                 # steplr: epochs between drops by `gamma`
    lr_min: float = 0.0                    # cosineannealinglr: final lr
    # Warm-up epochs before the main schedule, which then runs over the remaining epochs
    # (milestones / step size count from the end of warm-up, as in torchvision).
    lr_warmup_epochs: int = 0
    lr_warmup_method: str = "linear"       # linear: lr * decay -> lr; constant: lr * decay
    lr_warmup_decay: float = 0.01
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0               # > 0: torchvision.transforms.v2.MixUp on each batch
    cutmix_alpha: float = 0.0              # > 0: v2.CutMix (one of the two, at random, if both)
    clip_grad_norm: Optional[float] = None
    amp: bool = False                      # CUDA autocast (float16) + GradScaler
    model_ema: bool = False                # exponential moving average of weights and buffers
    model_ema_steps: int = 32              # iterations between EMA updates
    model_ema_decay: float = 0.99998       # per-iteration decay (adjusted for steps and batch)
    # 'best_val': keep the epoch with the best validation accuracy (default when a validation
    # loader exists); 'last': keep the last epoch (always so without a validation loader).
    select: Optional[str] = None
    # A batch whose loss is NaN/inf: 'stop' (before any weight changes; the last epoch's
    # checkpoint stays intact) or 'skip_batch' (no optimiser step for it; counted per epoch).
    nan_policy: str = "stop"

    def check(self, device: torch.device, has_val: bool) -> None:
        def bad(msg):
            raise TrainConfigError(msg)
        if self.optimizer not in OPTIMIZERS:
            bad(f"--opt '{self.optimizer}' is not supported; use one of {', '.join(OPTIMIZERS)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad(f"--lr-scheduler '{self.lr_scheduler}' is not supported; use one of "
                f"{', '.join(LR_SCHEDULERS)}")
        if self.lr_warmup_method not in WARMUP_METHODS:
            bad(f"--lr-warmup-method '{self.lr_warmup_method}' is not supported; use linear or constant")
        if self.epochs < 0 or self.lr_warmup_epochs < 0:
            bad("--epochs and --lr-warmup-epochs must not be negative")
        if self.lr_warmup_epochs and self.lr_warmup_epochs >= max(self.epochs, 1):
            bad(f"--lr-warmup-epochs {self.lr_warmup_epochs} leaves no epoch for the main schedule "
                f"of {self.epochs} epochs; lower it")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            bad("--mixup-alpha and --cutmix-alpha must not be negative")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            bad(f"--clip-grad-norm must be positive, got {self.clip_grad_norm}")
        if self.nan_policy not in NAN_POLICIES:
            bad(f"--nan_policy '{self.nan_policy}' is not supported; use one of "
                f"{', '.join(NAN_POLICIES)}")
        if self.amp and torch.device(device).type != "cuda":
            bad("--amp (mixed precision) needs a CUDA device; drop --amp or run on a GPU")
        if self.model_ema and (self.model_ema_steps < 1 or not 0.0 < self.model_ema_decay < 1.0):
            bad("--model-ema-steps must be >= 1 and --model-ema-decay in (0, 1)")
        if self.select not in (None, "best_val", "last"):
            bad(f"select '{self.select}' is not supported; use best_val or last")
        if self.select == "best_val" and not has_val:
            bad("best-on-validation selection needs a validation split; give --val_fraction > 0")


@dataclass
class TrainResult:
    best_val_acc: Optional[float]
    best_epoch: int
    epochs_run: int
    seconds: float
    history: List[dict] = field(default_factory=list)
    ema: Optional[nn.Module] = None        # the EMA copy (an AveragedModel) when cfg.model_ema
    finished: bool = True                  # False when stopped early by `stop_after`


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_metrics(model: nn.Module, loader, device, progress: bool = False, desc: str = "eval",
                     amp: bool = False) -> dict:
    """{'loss', 'top1', 'top5', 'count'} of `model` on `loader` (accuracies in %).

    In a distributed run the sums of loss, correct predictions and samples are all-reduced, so
    the result is exact over the union of the processes' loaders (shard them without padding:
    `utils.data.shard_loaders`); every process must call this. Restores the train/eval flag."""
    was = model.training
    model.eval()
    device = torch.device(device)
    # loss, top-1 correct, top-5 correct: summed on the device (no sync per batch); count on the host
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    count = 0
    show = progress and dist_utils.is_main()
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not show):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            out = model(x)
        out = out.float()
        hits = out.topk(min(5, out.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double()])
        count += y.numel()
    model.train(was)
    sums = torch.cat([sums, sums.new_tensor([float(count)])])
    sums = dist_utils.all_reduce_sum(sums)
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "count": 0}
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "count": int(n)}


def evaluate(model: nn.Module, loader, device, progress: bool = False, desc: str = "eval"):
    """(mean loss, top-1 accuracy in %) of `model` on `loader`; see `evaluate_metrics`."""
    m = evaluate_metrics(model, loader, device, progress=progress, desc=desc)
    return m["loss"], m["top1"]


# ----------------------------------------------------------------------------- building blocks

def _open_writer(log_dir: Optional[Path]):
    if log_dir is None or not dist_utils.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time; say so rather than log nothing
        warn_once("tensorboard", "tensorboard is not installed, so no TensorBoard logs are "
                                 "written; install it or pass --no-tensorboard")
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _cpu_state(model: nn.Module) -> dict:
    """A CPU copy of the model's state, safe from later in-place updates."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def build_scheduler(optimizer, cfg: TrainConfig):
    """Per-epoch lr schedule: the main schedule, after `lr_warmup_epochs` of warm-up if any
    (torchvision's arrangement: SequentialLR of a LinearLR/ConstantLR and the main one)."""
    sched = torch.optim.lr_scheduler
    main_epochs = cfg.epochs - cfg.lr_warmup_epochs
    if cfg.lr_scheduler == "steplr":
        main = sched.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.gamma)
    elif cfg.lr_scheduler == "cosineannealinglr":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(main_epochs, 1), eta_min=cfg.lr_min)
    else:
        main = sched.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.lr_warmup_epochs <= 0:
        return main
    if cfg.lr_warmup_method == "linear":
        warm = sched.LinearLR(optimizer, start_factor=cfg.lr_warmup_decay,
                              total_iters=cfg.lr_warmup_epochs)
    else:
        warm = sched.ConstantLR(optimizer, factor=cfg.lr_warmup_decay,
                                total_iters=cfg.lr_warmup_epochs)
    return sched.SequentialLR(optimizer, [warm, main], milestones=[cfg.lr_warmup_epochs])


def build_batch_mixer(cfg: TrainConfig, num_classes: int) -> Optional[Callable]:
    """MixUp / CutMix on a whole batch (inputs, int targets) -> (inputs, soft targets), or None."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    from torchvision.transforms import v2
    choices = []
    if cfg.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def _ema_decay_fn(decay: float) -> Callable:
    def ema_avg(averaged, current, num_averaged):
        return decay * averaged + (1.0 - decay) * current
    return ema_avg


def build_ema(model: nn.Module, cfg: TrainConfig, global_batch: int) -> torch.optim.swa_utils.AveragedModel:
    """EMA of weights and buffers, updated every `model_ema_steps` iterations. As in torchvision,
    the decay is given per iteration at a reference global batch of 1 and epoch count 1, and is
    adjusted so the averaging horizon in epochs does not depend on batch size, steps or epochs."""
    adjust = global_batch * cfg.model_ema_steps / max(cfg.epochs, 1)
    alpha = min(1.0, (1.0 - cfg.model_ema_decay) * adjust)
    return torch.optim.swa_utils.AveragedModel(model, avg_fn=_ema_decay_fn(1.0 - alpha),
                                               use_buffers=True)


def _sync_buffers(model: nn.Module) -> None:
    """Make every process hold rank 0's buffers (BatchNorm running statistics): with DDP each
    process updates them from its own batches, and evaluation and checkpoints must agree."""
    dist_utils.broadcast_from_main(model.buffers())


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist_utils.is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(getattr(batch_sampler, "sampler", None), "set_epoch"):
        batch_sampler.sampler.set_epoch(epoch)


def _num_classes(loaders, model: nn.Module) -> int:
    n = getattr(loaders, "num_classes", None)
    if n:
        return int(n)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features


# ----------------------------------------------------------------------------- training

def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (they must skip or stop together: DDP's
    backward is a collective)."""
    bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0)
    return float(dist_utils.all_reduce_sum(bad)) == 0.0


def _non_finite(cfg: TrainConfig, loss: torch.Tensor, epoch: int, step: int) -> None:
    where = f"epoch {epoch + 1}, step {step + 1}"
    if cfg.nan_policy == "stop":
        raise RunFailure(f"training loss became {loss.item()} at {where} (no weights changed; the "
                         "last epoch's checkpoint is intact); lower the learning rate, or pass "
                         "--nan_policy skip_batch to skip such batches")
    warn_once("nan-skip", f"training loss became {loss.item()} at {where}; skipping such batches "
                          "(--nan_policy skip_batch; the count per epoch is in the history)")


def train(model: nn.Module, loaders, cfg: TrainConfig, device, checkpoint_path: Path,
          resume: bool = False, log_dir: Optional[Path] = None, progress: bool = True,
          desc: str = "train", meta: Optional[dict] = None, monitor=None,
          stop_after: Optional[int] = None) -> TrainResult:
    """Train `model` in place; at the end it holds the selected weights (best validation epoch,
    or the last epoch when `cfg.select == 'last'` or `loaders.val` is None).

    checkpoint_path: the per-epoch resumable checkpoint (written atomically by rank 0; every rank
      resumes from it).
    meta: extra fields stored in the checkpoint (architecture name, class count, ...).
    monitor: a loader evaluated after every epoch for the record only (e.g. the reported test
      set; never used for selection): history gets test_loss, test_top1, test_top5.
    stop_after: stop after this many epochs in this call (the checkpoint lets `resume` go on),
      e.g. to fit a job's time limit.
    """
    device = torch.device(device)
    cfg.check(device, loaders.val is not None)
    select = cfg.select or ("best_val" if loaders.val is not None else "last")
    main = dist_utils.is_main()
    world = dist_utils.world_size()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp else None
    ema = build_ema(model, cfg, loaders.train.batch_size * world) if cfg.model_ema else None
    mixer = (build_batch_mixer(cfg, _num_classes(loaders, model))
             if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 else None)
    start_epoch, best_acc, best_epoch = 0, -1.0, -1
    best_state = None
    history: List[dict] = []
    if resume and Path(checkpoint_path).exists():
        ckpt = load_checkpoint(checkpoint_path)
        try:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            if scaler is not None:
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"checkpoint {checkpoint_path} does not match this run's model or "
                                  "recipe (architecture, optimiser, schedule, --model-ema, --amp); "
                                  "delete it or run without --resume") from None
        start_epoch = ckpt["epoch"]
        best_acc, best_epoch = ckpt["best_val_acc"], ckpt["best_epoch"]
        best_state = ckpt["best_state"]
        history = ckpt.get("history", [])
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        if len(rngs) == world:  # one RNG state per process
            _set_rng_state(rngs[dist_utils.rank()], loaders.train)
        else:  # another process count: fresh streams from the run's seed, the epoch and the rank
            seed_everything((torch.initial_seed() * 1_000_003 + start_epoch * 1009
                             + dist_utils.rank()) % 2 ** 31)
    elif loaders.val is not None and select == "best_val":
        # The starting point competes too: fine-tuning never hands back a network that is worse
        # on the validation split than the one it was given.
        best_acc = evaluate_metrics(model, loaders.val, device, amp=cfg.amp)["top1"]
        best_epoch = 0
        best_state = _cpu_state(model)
    net = _wrap_ddp(model, device)
    writer = _open_writer(log_dir)
    t0 = time.perf_counter()
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    epochs = tqdm(range(start_epoch, end_epoch), desc=desc, initial=start_epoch, total=cfg.epochs,
                  disable=not (progress and main), unit="epoch")
    steps_per_epoch = len(loaders.train)
    try:
        for epoch in epochs:
            net.train()
            _set_epoch(loaders.train, epoch)
            sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
            correct = torch.zeros((), dtype=torch.int64, device=device)  # summed without syncs
            t_epoch = time.perf_counter()
            skipped = 0
            for i, (x, y) in enumerate(tqdm(loaders.train, desc=f"epoch {epoch + 1}", leave=False,
                                            disable=not (progress and main))):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                hard = y
                if mixer is not None:
                    x, y = mixer(x, y)
                    hard = y.argmax(1)
                # skip_batch must also undo what a poisoned batch's forward does to BatchNorm
                saved = ([b.detach().clone() for b in model.buffers()]
                         if cfg.nan_policy == "skip_batch" else None)
                with torch.autocast(device.type, enabled=cfg.amp):
                    out = net(x)
                    loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
                    total = loss + cfg.regularizer(model) if cfg.regularizer is not None else loss
                optimizer.zero_grad(set_to_none=True)
                if not _all_finite(total):
                    skipped += 1
                    _non_finite(cfg, loss, epoch, i)
                    with torch.no_grad():
                        for b, old in zip(model.buffers(), saved):
                            b.copy_(old)
                    continue
                if scaler is not None:
                    scaler.scale(total).backward()
                    if cfg.clip_grad_norm is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    total.backward()
                    if cfg.clip_grad_norm is not None:
                        nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                    optimizer.step()
                value = loss.item()
                if ema is not None and (epoch * steps_per_epoch + i) % cfg.model_ema_steps == 0:
                    ema.update_parameters(model)
                    if epoch < cfg.lr_warmup_epochs:
                        ema.n_averaged.fill_(0)  # during warm-up the EMA just follows the model
                correct += (out.argmax(1) == hard).sum()
                sums += torch.tensor([value * y.shape[0], 0.0, y.shape[0]], dtype=torch.float64)
            scheduler.step()
            sums[1] = float(correct.item())
            _sync_buffers(model)
            if ema is not None:
                _sync_buffers(ema.module)  # its BatchNorm statistics were averaged per process
            train_seconds = time.perf_counter() - t_epoch
            loss_sum, correct, count = dist_utils.all_reduce_sum(sums).tolist()
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1),
                      "train_acc": 100.0 * correct / max(count, 1),
                      "lr": optimizer.param_groups[0]["lr"],
                      "train_images_per_s": count / max(train_seconds, 1e-9),
                      "skipped_batches": skipped}
            if loaders.val is not None:
                m = evaluate_metrics(model, loaders.val, device, amp=cfg.amp)
                record.update(val_loss=m["loss"], val_acc=m["top1"], val_top5=m["top5"])
            if monitor is not None:
                m = evaluate_metrics(model, monitor, device, progress=progress, desc="test",
                                     amp=cfg.amp)
                record.update(test_loss=m["loss"], test_top1=m["top1"], test_top5=m["top5"])
                if ema is not None:
                    m = evaluate_metrics(ema.module, monitor, device, amp=cfg.amp)
                    record.update(test_loss_ema=m["loss"], test_top1_ema=m["top1"],
                                  test_top5_ema=m["top5"])
            history.append(record)
            if select == "best_val" and record["val_acc"] > best_acc:
                best_acc, best_epoch = record["val_acc"], epoch + 1
                best_state = _cpu_state(model)
            if writer is not None:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(f"{desc}/{k}", v, epoch + 1)
            if "val_acc" in record:
                epochs.set_postfix(val_acc=f"{record['val_acc']:.2f}", best=f"{best_acc:.2f}")
            elif "test_top1" in record:
                epochs.set_postfix(test_top1=f"{record['test_top1']:.2f}")
            rngs = dist_utils.all_gather_object(_rng_state(loaders.train))
            if main:
                state = {"format": FORMAT, "kind": "training", **(meta or {}),
                         "epoch": epoch + 1, "state_dict": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_val_acc": best_acc, "best_epoch": best_epoch,
                         "best_state": best_state, "history": history, "world_size": world,
                         "rng": rngs[0] if world == 1 else rngs}
                if ema is not None:
                    state["ema"] = ema.state_dict()
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                save_atomic(state, checkpoint_path)
            dist_utils.barrier()  # nobody runs ahead of (or exits before) the checkpoint
    finally:
        if writer is not None:
            writer.close()
    if select == "best_val" and best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_acc = history[-1].get("val_acc") if history else None
        best_epoch = history[-1]["epoch"] if history else start_epoch
    return TrainResult(best_acc, best_epoch, end_epoch - start_epoch, time.perf_counter() - t0,
                       history, ema=ema, finished=end_epoch >= cfg.epochs)


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

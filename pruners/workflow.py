"""The steps the scripts are made of: get the dense network, prune to a target, fine-tune, record.

Paths (all relative to the current directory unless absolute):
  dense checkpoint   <save_path_prefix>/<dataset>_<model>.pth      (or --pretrained)
  its training state <save_path_prefix>/<dataset>_<model>.train.pth (per epoch, for --resume)
  per target         <output_dir>/ops_<ratio>/{pruned_model.pth, results.json, pruned_init.pth,
                                               finetune.train.pth, tb/}
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from models import get_classifier, get_model
from utils.checkpoint import (FORMAT, CheckpointError, check_writable, load_checkpoint,
                              load_pruned_model, load_state_into, save_atomic,
                              save_pruned_model, write_json)
from utils.cli import default_milestones, method_options, resolve_device
from utils.data import build_loaders, iterate_batches
from utils.engine import TrainConfig, evaluate, recalibrate_batchnorm, seed_everything, train
from utils.flops import count_macs, count_params, format_count

from .driver import PruneSettings, channel_widths, prune_to_target
from .registry import get_method


@dataclass
class Context:
    args: object
    device: torch.device
    loaders: object
    example_inputs: torch.Tensor
    out_dir: Path


def setup(args) -> Context:
    """Validate what can be validated before any long work, then build the data loaders."""
    from models import available_models
    if args.model not in available_models():
        get_model(args.model, 10)  # raises the one-line "unknown model" error
    importance = getattr(args, "importance_type", None)
    if importance is not None:
        get_method(importance)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    out = args.output_dir or f"outputs/{args.dataset}_{args.model}" + (
        f"_{importance}" if importance else "")
    out_dir = check_writable(out)
    check_writable(args.save_path_prefix)
    loaders = build_loaders(args.dataset, data_root=args.data_root, batch_size=args.batch_size,
                            eval_batch_size=args.eval_batch_size, num_workers=args.num_workers,
                            download=args.download, val_fraction=args.val_fraction, seed=args.seed,
                            pin_memory=device.type == "cuda")
    example = loaders.example_inputs(2).to(device)
    return Context(args, device, loaders, example, out_dir)


def dense_paths(args):
    prefix = Path(args.save_path_prefix)
    stem = f"{args.dataset}_{args.model}"
    if getattr(args, "sparsity_l1", 0.0) > 0:  # a slimming-trained network is a different network
        stem += f"_l1-{args.sparsity_l1:g}"
    final = Path(args.pretrained) if args.pretrained else prefix / f"{stem}.pth"
    return final, prefix / f"{stem}.train.pth"


def _regularizer(args) -> Optional[Callable]:
    if getattr(args, "sparsity_l1", 0.0) > 0:
        from .slimming import bn_l1_penalty
        lam = args.sparsity_l1
        return lambda m: lam * bn_l1_penalty(m)
    return None


def load_or_train_dense(ctx: Context) -> nn.Module:
    """The dense network: from its checkpoint if present, else trained now (and saved)."""
    args = ctx.args
    model = get_model(args.model, ctx.loaders.num_classes, weights=args.weights).to(ctx.device)
    final, partial = dense_paths(args)
    if final.exists():
        ckpt = load_checkpoint(final)
        if ckpt.get("arch") not in (None, args.model):
            raise CheckpointError(f"checkpoint {final} belongs to model '{ckpt.get('arch')}', not "
                                  f"'{args.model}'; pass the matching --model or another --pretrained")
        load_state_into(model, ckpt["state_dict"], final, args.model)
        return model
    if args.pretrained:
        raise CheckpointError(f"--pretrained {final} does not exist; check the path or drop the flag "
                              "to train the dense network")
    if args.num_epochs <= 0:
        return model  # e.g. ImageNet weights supplied through --weights
    cfg = TrainConfig(epochs=args.num_epochs, lr=args.lr,
                      milestones=default_milestones(args.num_epochs, args.milestones),
                      gamma=args.lr_gamma, momentum=args.momentum, weight_decay=args.weight_decay,
                      regularizer=_regularizer(args))
    meta = {"arch": args.model, "num_classes": ctx.loaders.num_classes, "dataset": args.dataset}
    result = train(model, ctx.loaders, cfg, ctx.device, partial, resume=args.resume,
                   log_dir=(ctx.out_dir / "tb" / "dense") if args.tensorboard else None,
                   progress=args.progress, desc="dense training", meta=meta)
    save_atomic({"format": FORMAT, "kind": "dense", **meta, "state_dict": model.state_dict(),
                 "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch}, final)
    return model


def prune_settings(args, target: float) -> PruneSettings:
    method = get_method(args.importance_type)
    return PruneSettings(target_ops_ratio=target, iterative_steps=args.iterative_steps,
                         iters_per_step=args.iters_per_step,
                         max_pruning_ratio=args.max_pruning_ratio, normalizer=args.normalizer,
                         multivariable=args.multivariable, prune_heads=args.prune_heads,
                         method_options=method_options(args, method))


def importance_batches(ctx: Context) -> Callable:
    """batches(n) -> n training batches for importance estimation, from a loader of its own seeded
    by --seed, so the same seed gives the same masks whether the dense network was just trained in
    this process or loaded from disk."""
    train = ctx.loaders.train
    loader = DataLoader(train.dataset, batch_size=train.batch_size, shuffle=True, drop_last=train.drop_last,
                        num_workers=train.num_workers, collate_fn=train.collate_fn,
                        generator=torch.Generator().manual_seed(ctx.args.seed))

    def make(n):
        return iterate_batches(loader, n)
    return make


def _recalibrator(ctx: Context, batches: Callable) -> Optional[Callable]:
    n = ctx.args.bn_recalibration_batches
    if n <= 0:
        return None
    return lambda model: recalibrate_batchnorm(model, batches(n), ctx.device)


def prune_model(ctx: Context, model: nn.Module, target: float, reference_macs: int,
                original_widths: Dict) -> tuple:
    """Prune to `target` (fraction of reference MACs kept). Returns (model, report dict)."""
    args = ctx.args
    loss_fn = nn.CrossEntropyLoss()
    classifier = get_classifier(model)
    if args.importance_type == "Eigen":
        from .eigendamage import prune_to_macs_target
        # EigenDamage searches its global threshold against the network it is given.
        current = count_macs(model, ctx.example_inputs[:1])
        rel_target = target * reference_macs / current
        if rel_target >= 1.0:
            return model, {"steps": 0, "seconds_estimating": 0.0, "seconds_pruning": 0.0}
        t0 = time.perf_counter()
        batches = list(importance_batches(ctx)(args.iters_per_step))
        pruned, info = prune_to_macs_target(
            model, batches, loss_fn, ctx.example_inputs[:1], rel_target,
            max_pruning_ratio=args.max_pruning_ratio, classifier=classifier,
            fisher_type=args.fisher_type, depthwise=args.depthwise)
        total = time.perf_counter() - t0
        est = float(info.get("seconds_estimating", 0.0))
        return pruned, {"steps": 1, "seconds_estimating": est, "seconds_pruning": total - est,
                        "eigen_prune_ratio": info.get("prune_ratio")}
    batches = importance_batches(ctx)
    report = prune_to_target(model, args.importance_type, batches, loss_fn,
                             ctx.example_inputs, prune_settings(args, target), [classifier],
                             reference_macs=reference_macs, original_widths=original_widths,
                             progress=args.progress, recalibrate=_recalibrator(ctx, batches))
    return model, {"steps": report.steps, "seconds_estimating": report.seconds_estimating,
                   "seconds_pruning": report.seconds_pruning}


def finetune(ctx: Context, model: nn.Module, target_dir: Path, desc: str) -> dict:
    args = ctx.args
    if args.sl_num_epochs <= 0:
        return {"seconds": 0.0, "best_val_acc": None}
    cfg = TrainConfig(epochs=args.sl_num_epochs, lr=args.sl_lr,
                      milestones=default_milestones(args.sl_num_epochs, args.sl_milestones),
                      gamma=args.lr_gamma, momentum=args.momentum, weight_decay=args.sl_weight_decay)
    result = train(model, ctx.loaders, cfg, ctx.device, target_dir / "finetune.train.pth",
                   resume=args.resume, log_dir=(target_dir / "tb") if args.tensorboard else None,
                   progress=args.progress, desc=desc)
    return {"seconds": result.seconds, "best_val_acc": result.best_val_acc}


def target_dir(ctx: Context, target: float) -> Path:
    return ctx.out_dir / f"ops_{target:g}"


def prune_and_finetune(ctx: Context, model: nn.Module, target: float, dense: dict,
                       original_widths: Dict) -> tuple:
    """One target: prune (or pick up the pruned network of an interrupted run), fine-tune, record."""
    args = ctx.args
    tdir = target_dir(ctx, target)
    tdir.mkdir(parents=True, exist_ok=True)
    init_path = tdir / "pruned_init.pth"
    if args.resume and init_path.exists() and (tdir / "finetune.train.pth").exists():
        model, saved = load_pruned_model(init_path, device=ctx.device, with_meta=True)
        prune_info = saved["prune_info"]
    else:
        seed_everything(args.seed)
        model, prune_info = prune_model(ctx, model, target, dense["macs"], original_widths)
        model.to(ctx.device)
        # Accuracy right after pruning, before and after re-estimating BatchNorm statistics
        # (no weight changes either way); the second is what fine-tuning starts from.
        prune_info["test_acc_pruned_stale_bn"] = evaluate(model, ctx.loaders.test, ctx.device)[1]
        recal = _recalibrator(ctx, importance_batches(ctx))
        if recal is not None:
            recal(model)
        prune_info["test_acc_pruned"] = evaluate(model, ctx.loaders.test, ctx.device)[1]
        save_pruned_model(model, init_path, prune_info=prune_info)
    macs = count_macs(model, ctx.example_inputs[:1])
    params = count_params(model)
    ft = finetune(ctx, model, tdir, desc=f"fine-tune ops {target:g}")
    test_loss, test_acc = evaluate(model, ctx.loaders.test, ctx.device)
    record = {
        "dataset": args.dataset, "model": args.model, "importance_type": args.importance_type,
        "target_ops_ratio": target, "achieved_ops_ratio": macs / dense["macs"],
        "achieved_params_ratio": params / dense["params"], "flops_unit": "MACs",
        "dense_macs": dense["macs"], "dense_params": dense["params"],
        "pruned_macs": macs, "pruned_params": params,
        "test_acc_dense": dense["test_acc"], "test_acc_pruned": prune_info["test_acc_pruned"],
        "test_acc_pruned_stale_bn": prune_info["test_acc_pruned_stale_bn"],
        "test_acc_finetuned": test_acc, "val_acc_finetuned_best": ft["best_val_acc"],
        "seconds_importance": prune_info["seconds_estimating"],
        "seconds_pruning": prune_info["seconds_pruning"], "seconds_finetune": ft["seconds"],
        "pruning_steps": prune_info["steps"], "seed": args.seed,
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list))
                     or v is None},
    }
    if "eigen_prune_ratio" in prune_info:
        record["eigen_prune_ratio"] = prune_info["eigen_prune_ratio"]
    save_pruned_model(model, tdir / "pruned_model.pth", results=record)
    write_json(record, tdir / "results.json")
    return model, record


def dense_record(ctx: Context, model: nn.Module) -> dict:
    return {"macs": count_macs(model, ctx.example_inputs[:1]), "params": count_params(model),
            "test_acc": evaluate(model, ctx.loaders.test, ctx.device)[1]}


def summary_line(r: dict) -> str:
    return (f"{r['importance_type']} ops {r['target_ops_ratio']:g}: MACs {format_count(r['dense_macs'])}"
            f" -> {format_count(r['pruned_macs'])} (ratio {r['achieved_ops_ratio']:.3f}), params "
            f"{format_count(r['dense_params'])} -> {format_count(r['pruned_params'])} "
            f"(ratio {r['achieved_params_ratio']:.3f}); test acc dense {r['test_acc_dense']:.2f}% | "
            f"pruned {r['test_acc_pruned']:.2f}% | fine-tuned {r['test_acc_finetuned']:.2f}%; "
            f"importance estimation {r['seconds_importance']:.1f}s")


def report(ctx: Context, records) -> None:
    """Write summary.json for the run and print one readable line per target."""
    write_json(records, ctx.out_dir / "summary.json")
    print(f"\nResults ({ctx.out_dir}):")
    for r in records:
        print("  " + summary_line(r))

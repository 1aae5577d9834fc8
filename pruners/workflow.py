"""The steps the scripts are made of: get the dense network, prune to a target, fine-tune, record.

The CIFAR scripts (train_prune.py, iterative_prune.py) and prune_imagenet.py are made of these
steps. Under torchrun (prune_imagenet.py) every process runs the same steps on its share of the
importance batches; scores are summed over processes inside the criteria, every process removes
the same channels (checked after each step), and only rank 0 writes files.

Paths (all relative to the current directory unless absolute):
  dense checkpoint   <save_path_prefix>/<dataset>_<model>.pth      (or --pretrained)
  its training state <save_path_prefix>/<dataset>_<model>.train.pth (per epoch, for --resume)
  per target         <output_dir>/ops_<ratio>/{pruned_model.pth, results.json, pruned_init.pth,
                                               finetune.train.pth, tb/}
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from models import get_classifier, get_model
from utils.checkpoint import (FORMAT, CheckpointError, check_writable, load_checkpoint,
                              load_pruned_model, load_state_into, remove_stale_temps, save_atomic,
                              save_pruned_model, write_json)
from utils.cli import UsageError, default_milestones, method_options, settings
from utils.data import BatchStream, build_loaders, shard_loaders
from utils.distributed import (DistInfo, agreed, average_batchnorm_statistics, check_same_model,
                               env_world_size, init_distributed)
from utils.engine import (TrainConfig, evaluate_metrics, recalibrate_batchnorm, seed_everything,
                          train, use_deterministic_algorithms)
from utils.flops import count_macs, count_params, format_count
from utils.log import pause_point

from .driver import PruneSettings, channel_widths, prune_to_target
from .registry import BatchSizes, get_method, out_of_memory_as_failure


@dataclass
class Context:
    args: object
    device: torch.device
    loaders: object
    example_inputs: torch.Tensor
    out_dir: Path
    dist: DistInfo
    batches: Callable  # batches(n, shard=True) -> n fresh training batches (this process's share)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def progress(self) -> bool:
        return bool(self.args.progress) and self.is_main


def setup(args, importance_batch_size: Optional[int] = None,
          multi_process: bool = False, output_flag: str = "--output_dir") -> Context:
    """Validate what can be validated before any long work, join the torchrun process group if
    there is one (only scripts that share their work out say `multi_process`), then build the
    data loaders. output_flag: the script's name for args.output_dir, as its messages say it."""
    from models import available_models
    if args.model not in available_models():
        get_model(args.model, 10)  # raises the one-line "unknown model" error
    importance = getattr(args, "importance_type", None)
    if importance is not None:
        get_method(importance)
    if env_world_size() > 1 and not multi_process:
        raise UsageError(f"{Path(sys.argv[0]).name} runs in one process; start it without torchrun "
                         "(prune_imagenet.py and train_imagenet.py share their work over processes)")
    if getattr(args, "deterministic", False):
        use_deterministic_algorithms()  # before init_distributed: CUDA work may start there
    dist = init_distributed(args.device)
    seed_everything(args.seed)
    out = args.output_dir or f"outputs/{args.dataset}_{args.model}" + (
        f"_{importance}" if importance else "")
    out_dir = Path(out)
    agreed(lambda: (check_resumable(args, out_dir, output_flag),
                    check_writable(out_dir, output_flag),
                    check_writable(args.save_path_prefix, "--save_path_prefix")))
    if args.resume and dist.is_main:
        for folder in (out_dir, args.save_path_prefix):
            remove_stale_temps(folder)
    loaders = build_loaders(args.dataset, data_root=args.data_root, batch_size=args.batch_size,
                            eval_batch_size=args.eval_batch_size, num_workers=args.num_workers,
                            download=args.download, val_fraction=args.val_fraction, seed=args.seed,
                            pin_memory=dist.device.type == "cuda",
                            image_size=getattr(args, "image_size", None))
    example = loaders.example_inputs(2).to(dist.device)
    # Importance batches come from a stream of their own, seeded by --seed, so the same seed gives
    # the same masks whether the dense network was just trained in this process or loaded.
    train = loaders.train
    stream = BatchStream(train.dataset, importance_batch_size or train.batch_size, args.seed,
                         num_workers=train.num_workers, pin_memory=dist.device.type == "cuda")
    if dist.distributed:  # each process evaluates its own part of the test set
        loaders = shard_loaders(loaders, args.seed)
    return Context(args, dist.device, loaders, example, out_dir, dist, stream)


def check_resumable(args, out_dir: Path, output_flag: str = "--output_dir") -> None:
    """--resume needs something of this run on disk: the dense checkpoint (final or per-epoch)
    or a checkpoint / record under the output folder. Otherwise it is most likely a mistyped
    folder, and a silent fresh start could cost days; say so instead."""
    if not getattr(args, "resume", False):
        return
    final, partial = dense_paths(args)
    if final.exists() or partial.exists():
        return
    if out_dir.is_dir() and any(p.suffix in (".pth", ".json") for p in out_dir.rglob("*")
                                if not p.name.startswith(".")):
        return
    raise UsageError(f"--resume: nothing to resume (no checkpoint {partial} or {final}, no "
                     f"results under {out_dir}); check {output_flag}/--save_path_prefix or run "
                     "without --resume to start afresh")


def reseed(ctx: Context) -> None:
    """Every random stream back to --seed (global RNGs, the training loader's shuffling, the
    importance batches), so what follows (pruning, then fine-tuning) is the same whether the dense
    network was trained in this process, loaded, or this is a resumed run, and whatever targets
    came before."""
    seed_everything(ctx.args.seed)
    gen = getattr(ctx.loaders.train, "generator", None)
    if gen is not None:
        gen.manual_seed(int(ctx.args.seed))
    ctx.batches.restart()


def dense_paths(args):
    prefix = Path(args.save_path_prefix)
    stem = f"{args.dataset}_{args.model}"
    if getattr(args, "sparsity_l1", 0.0) > 0:  # a slimming-trained network is a different network
        stem += f"_l1-{args.sparsity_l1:g}"
    final = Path(args.pretrained) if args.pretrained else prefix / f"{stem}.pth"
    return final, prefix / f"{stem}.train.pth"


def load_pretrained(ctx: Context) -> nn.Module:
    """The pretrained network of --model/--weights (a torchvision weights name from the torch hub
    cache, or a local file), classifier sized to the dataset. Never trains."""
    args = ctx.args
    return get_model(args.model, ctx.loaders.num_classes, weights=args.weights,
                     **model_kwargs(args)).to(ctx.device)


def model_kwargs(args) -> dict:
    """Extra get_model options of --model: ViT position embeddings are sized to --image_size."""
    if args.model.startswith("vit_") and getattr(args, "image_size", None):
        return {"image_size": args.image_size}
    return {}


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
    if args.weights:
        return model  # pretrained weights are pruned as they are, never re-trained
    if args.num_epochs <= 0:
        return model
    cfg = TrainConfig(epochs=args.num_epochs, lr=args.lr,
                      milestones=default_milestones(args.num_epochs, args.milestones),
                      gamma=args.lr_gamma, momentum=args.momentum, weight_decay=args.weight_decay,
                      regularizer=_regularizer(args), nan_policy=args.nan_policy)
    meta = {"arch": args.model, "num_classes": ctx.loaders.num_classes, "dataset": args.dataset}
    result = train(model, ctx.loaders, cfg, ctx.device, partial, resume=args.resume,
                   log_dir=(ctx.out_dir / "tb" / "dense") if args.tensorboard else None,
                   progress=ctx.progress, desc="dense training", meta=meta)
    save_atomic({"format": FORMAT, "kind": "dense", **meta, "state_dict": model.state_dict(),
                 "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch}, final)
    return model


def prune_settings(args, target: float) -> PruneSettings:
    method = get_method(args.importance_type)
    return PruneSettings(target_ops_ratio=target, iterative_steps=args.iterative_steps,
                         iters_per_step=args.iters_per_step,
                         max_pruning_ratio=args.max_pruning_ratio, normalizer=args.normalizer,
                         multivariable=args.multivariable, prune_heads=args.prune_heads,
                         score_mode=args.score_mode,
                         method_options=method_options(args, method))


def recalibrator(ctx: Context) -> Optional[Callable]:
    """model -> None: re-estimate BatchNorm statistics on --bn_recalibration_batches batches
    (shared out over processes and averaged back, so every process ends with the same ones)."""
    n = ctx.args.bn_recalibration_batches
    if n <= 0:
        return None

    def recalibrate(model):
        used = recalibrate_batchnorm(model, ctx.batches(n), ctx.device)
        average_batchnorm_statistics(model, used)
    return recalibrate


def prune_model(ctx: Context, model: nn.Module, target: float, reference_macs: int,
                original_widths: Dict) -> tuple:
    """Prune to `target` (fraction of reference MACs kept). Returns (model, report dict)."""
    args = ctx.args
    loss_fn = nn.CrossEntropyLoss()
    classifier = get_classifier(model)
    method = get_method(args.importance_type)
    if method.prune_to_target is not None:
        # The criterion rebuilds the network (EigenDamage) and searches its own global threshold
        # against the network it is given.
        current = count_macs(model, ctx.example_inputs[:1])
        rel_target = target * reference_macs / current
        if rel_target >= 1.0:
            return model, {"steps": 0, "seconds_estimating": 0.0, "seconds_pruning": 0.0}
        t0 = time.perf_counter()
        batches = BatchSizes(list(ctx.batches(args.iters_per_step)))
        options = method_options(args, method, method.options + method.prune_options)
        with out_of_memory_as_failure(args.importance_type, batches):
            pruned, info = method.prune_to_target(
                model, batches, loss_fn, ctx.example_inputs[:1], rel_target,
                max_pruning_ratio=args.max_pruning_ratio, classifier=classifier, **options)
        check_same_model(pruned, f"{args.importance_type} pruning")
        total = time.perf_counter() - t0
        est = float(info.get("seconds_estimating", 0.0))
        return pruned, {"steps": 1, "seconds_estimating": est, "seconds_pruning": total - est,
                        "eigen_prune_ratio": info.get("prune_ratio")}
    recal = recalibrator(ctx)

    def after_step(model):
        if recal is not None:
            recal(model)
        pause_point(f"pruning step {target:g}")  # a test interrupts here, between two steps

    report = prune_to_target(model, args.importance_type, ctx.batches, loss_fn,
                             ctx.example_inputs, prune_settings(args, target), [classifier],
                             reference_macs=reference_macs, original_widths=original_widths,
                             progress=ctx.progress, recalibrate=after_step)
    return model, {"steps": report.steps, "seconds_estimating": report.seconds_estimating,
                   "seconds_pruning": report.seconds_pruning, "layers_left_alone": report.left_alone}


def test_metrics(ctx: Context, model: nn.Module) -> dict:
    """Loss, top-1 and top-5 on the test split (ImageNet: the val folder); all processes agree."""
    return evaluate_metrics(model, ctx.loaders.test, ctx.device, progress=ctx.progress,
                            desc="test")


def prune_and_measure(ctx: Context, model: nn.Module, target: float, reference_macs: int,
                      original_widths: Dict, measure: bool = True) -> tuple:
    """Prune to `target`, then (with `measure`) test accuracy right after pruning, before and
    after re-estimating BatchNorm statistics (no weight changes either way); the second is what
    fine-tuning starts from. Returns (model, prune info)."""
    reseed(ctx)
    model, info = prune_model(ctx, model, target, reference_macs, original_widths)
    model.to(ctx.device)
    stale = test_metrics(ctx, model) if measure else None
    recal = recalibrator(ctx)
    if recal is not None:
        recal(model)
    fresh = test_metrics(ctx, model) if measure else None
    if measure:
        info.update(test_acc_pruned_stale_bn=stale["top1"], test_acc_pruned=fresh["top1"],
                    test_top5_pruned=fresh["top5"], test_loss_pruned=fresh["loss"])
    return model, info


def finetune(ctx: Context, model: nn.Module, target_dir: Path, desc: str) -> dict:
    args = ctx.args
    if args.sl_num_epochs <= 0:
        return {"seconds": 0.0, "best_val_acc": None}
    cfg = TrainConfig(epochs=args.sl_num_epochs, lr=args.sl_lr,
                      milestones=default_milestones(args.sl_num_epochs, args.sl_milestones),
                      gamma=args.lr_gamma, momentum=args.momentum, weight_decay=args.sl_weight_decay,
                      nan_policy=args.nan_policy)
    result = train(model, ctx.loaders, cfg, ctx.device, target_dir / "finetune.train.pth",
                   resume=args.resume, log_dir=(target_dir / "tb") if args.tensorboard else None,
                   progress=ctx.progress, desc=desc)
    return {"seconds": result.seconds, "best_val_acc": result.best_val_acc}


def model_identity(ctx: Context) -> dict:
    """What a pruned-model file records about the network it was pruned from (the loader
    starts from that dense skeleton)."""
    return {"arch": ctx.args.model, "num_classes": ctx.loaders.num_classes,
            "model_kwargs": model_kwargs(ctx.args)}


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
        model, prune_info = prune_and_measure(ctx, model, target, dense["macs"], original_widths)
        save_pruned_model(model, init_path, prune_info=prune_info, **model_identity(ctx))
    ft = finetune(ctx, model, tdir, desc=f"fine-tune ops {target:g}")
    final = test_metrics(ctx, model)
    record = pruned_record(ctx, model, target, dense, prune_info)
    kept = layer_keep_fraction(model, original_widths, ctx.example_inputs[:1])
    record.update(layer_keep_fraction=kept, layer_order=list(kept),  # JSON keys get sorted
                  test_acc_finetuned=final["top1"], test_top5_finetuned=final["top5"],
                  val_acc_finetuned_best=ft["best_val_acc"], seconds_finetune=ft["seconds"])
    save_pruned_model(model, tdir / "pruned_model.pth", results=record, **model_identity(ctx))
    write_json(record, tdir / "results.json")
    return model, record


def pruned_record(ctx: Context, model: nn.Module, target: float, dense: dict,
                  prune_info: dict) -> dict:
    """The results record of one target (fine-tuning fields are added by the caller)."""
    args = ctx.args
    macs = count_macs(model, ctx.example_inputs[:1])
    params = count_params(model)
    record = {
        "dataset": args.dataset, "model": args.model, "importance_type": args.importance_type,
        "target_ops_ratio": target, "achieved_ops_ratio": macs / dense["macs"],
        "achieved_params_ratio": params / dense["params"], "flops_unit": "MACs",
        "dense_macs": dense["macs"], "dense_params": dense["params"],
        "pruned_macs": macs, "pruned_params": params,
        "test_acc_dense": dense.get("test_acc"), "test_top5_dense": dense.get("test_top5"),
        "seconds_importance": prune_info["seconds_estimating"],
        "seconds_pruning": prune_info["seconds_pruning"],
        "pruning_steps": prune_info["steps"], "seed": args.seed,
        "world_size": ctx.dist.world_size,
        "settings": settings(args),  # every flag's effective value, the recipe's included
    }
    for key in ("test_acc_pruned", "test_acc_pruned_stale_bn", "test_top5_pruned",
                "test_loss_pruned", "eigen_prune_ratio", "layers_left_alone"):
        if key in prune_info:
            record[key] = prune_info[key]
    return record


def layer_keep_fraction(model: nn.Module, original_widths: Dict,
                        example_inputs: torch.Tensor) -> Dict[str, float]:
    """{layer: fraction of its original output channels kept}, in the order the layers run on
    `example_inputs`. A layer that EigenDamage turned into a bottleneck counts the width of its
    core (the kept eigenbasis)."""
    modules = dict(model.named_modules())
    order, hooks = [], []
    for name in original_widths:
        if name in modules:
            hooks.append(modules[name].register_forward_hook(
                lambda m, i, o, name=name: order.append(name) if name not in order else None))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    fractions = {}
    for name in order + [n for n in original_widths if n in modules and n not in order]:
        module = getattr(modules[name], "core", modules[name])
        kept = getattr(module, "out_channels", getattr(module, "out_features", None))
        if kept is not None:
            fractions[name] = kept / original_widths[name]["out"]
    return fractions


def dense_record(ctx: Context, model: nn.Module, measure: bool = True) -> dict:
    record = {"macs": count_macs(model, ctx.example_inputs[:1]), "params": count_params(model)}
    if measure:
        metrics = test_metrics(ctx, model)
        record.update(test_acc=metrics["top1"], test_top5=metrics["top5"])
    return record


def summary_line(r: dict) -> str:
    line = (f"{r['importance_type']} ops {r['target_ops_ratio']:g}: MACs "
            f"{format_count(r['dense_macs'])} -> {format_count(r['pruned_macs'])} (ratio "
            f"{r['achieved_ops_ratio']:.3f}), params {format_count(r['dense_params'])} -> "
            f"{format_count(r['pruned_params'])} (ratio {r['achieved_params_ratio']:.3f})")
    accs = [(label, r.get(key)) for label, key in (("dense", "test_acc_dense"),
                                                   ("pruned", "test_acc_pruned"),
                                                   ("fine-tuned", "test_acc_finetuned"))]
    accs = [f"{label} {value:.2f}%" for label, value in accs if value is not None]
    if accs:
        line += "; test acc " + " | ".join(accs)
    return line + f"; importance estimation {r['seconds_importance']:.1f}s"


def report(ctx: Context, records, summary_path: Optional[Path] = None) -> None:
    """Write summary.json for the run and print one readable line per finished target (rank 0
    only)."""
    if not ctx.is_main:
        return
    write_json(records, summary_path or ctx.out_dir / "summary.json")
    print(f"\nResults ({ctx.out_dir}):")
    for r in records:
        if r.get("status") == "failed":
            print(f"  {r['importance_type']} ops {r['target_ops_ratio']:g}: failed: {r['error']}")
        else:
            print("  " + summary_line(r))


def run_targets(ctx: Context, targets, run_one: Callable[[float], dict],
                summary_path: Optional[Path] = None) -> list:
    """records = [run_one(target) for target in targets], then the summary. When a target fails,
    the summary still records every finished target and the failed one (status 'failed' and the
    error) before the error goes on to the user."""
    records = []
    for target in targets:
        try:
            records.append(run_one(target))
        except Exception as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            failed = {"importance_type": ctx.args.importance_type, "target_ops_ratio": target,
                      "status": "failed", "error": message, "settings": settings(ctx.args)}
            report(ctx, records + [failed], summary_path)
            raise
    report(ctx, records, summary_path)
    return records

#!/usr/bin/env python
"""Unstructured or N:M weight sparsity: dense network -> masked network -> fine-tune -> export.

    python train_unstructured_prune.py --importance_type OBA --dataset cifar10 --model resnet20 --pruning_ratio 0.1
    python train_unstructured_prune.py --importance_type OBA --model resnet20 --pattern 2:4

--pruning_ratio is the fraction of prunable weights KEPT (0.1 keeps 10 %); with --pattern N:M it is
implied (N/M).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from models import get_classifier, get_model  # noqa: E402
from pruners import unstructured as us  # noqa: E402
from pruners import workflow  # noqa: E402
from pruners.group_scores import NORMALIZERS  # noqa: E402
from pruners.registry import get_method  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import FORMAT, load_checkpoint, save_atomic, write_json  # noqa: E402
from utils.engine import TrainConfig, train  # noqa: E402

# Criteria whose per-parameter scores are per weight (Eigen re-parameterises, Slim scores BatchNorm).
CRITERIA = ("OBA", "fastOBA", "Taylor", "Weight", "Random", "C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS")
DEFAULT_DENSITY = 0.1


def build_parser():
    p = cli.parser(__doc__.splitlines()[0], script="train_unstructured_prune")
    cli.add_common(p)
    cli.add_pruning(p)
    g = p.add_argument_group("unstructured / N:M sparsity")
    g.add_argument("--pruning_ratio", type=float, default=None,
                   help=f"fraction of prunable weights kept (default {DEFAULT_DENSITY}; "
                        "N/M with --pattern N:M)")
    g.add_argument("--pattern", default="unstructured",
                   help="unstructured (one global threshold) or N:M, e.g. 2:4 (N kept of every M "
                        "consecutive weights along the input dimension)")
    g.add_argument("--prune_classifier", action=argparse.BooleanOptionalAction, default=False,
                   help="sparsify the final classifier too")
    g.add_argument("--max_layer_sparsity", type=float, default=0.99,
                   help="no layer loses more than this fraction of its weights (unstructured)")
    g.add_argument("--ft_between_steps", type=int, default=0,
                   help="fine-tuning epochs after every pruning step but the last")
    return p


def parse(argv=None):
    return cli.parse(build_parser(), argv)


def check_request(args):
    """Everything that can be wrong with the command line, before anything is written."""
    pattern = us.parse_pattern(args.pattern)
    if args.pruning_ratio is not None:
        cli.check_ratios([args.pruning_ratio], flag="--pruning_ratio")
    if pattern is not None:
        implied = pattern[0] / pattern[1]
        if args.pruning_ratio is not None and abs(args.pruning_ratio - implied) > 1e-9:
            raise cli.UsageError(f"--pruning_ratio {args.pruning_ratio:g} conflicts with --pattern "
                                 f"{args.pattern} (which keeps {implied:g}); drop --pruning_ratio")
        density = implied
    else:
        density = DEFAULT_DENSITY if args.pruning_ratio is None else args.pruning_ratio
    if args.importance_type not in CRITERIA:
        get_method(args.importance_type)  # an unknown name gets the registry's one-line error
        raise cli.UsageError(f"--importance_type {args.importance_type} gives no per-weight scores; "
                             f"choose one of: {', '.join(CRITERIA)}")
    if args.normalizer not in NORMALIZERS:
        raise cli.UsageError(f"--normalizer '{args.normalizer}' is unknown; choose one of: "
                             f"{', '.join(NORMALIZERS)}")
    if not 0.0 <= args.max_layer_sparsity < 1.0:
        raise cli.UsageError(f"--max_layer_sparsity {args.max_layer_sparsity:g} must lie in [0, 1)")
    if args.iterative_steps < 1 or args.iters_per_step < 1 or args.ft_between_steps < 0:
        raise cli.UsageError("--iterative_steps and --iters_per_step must be at least 1, "
                             "--ft_between_steps at least 0")
    if args.output_dir is None:
        args.output_dir = (f"outputs/{args.dataset}_{args.model}_{args.importance_type}_"
                           f"{us.pattern_tag(pattern)}")
    return pattern, density


def sparsify(ctx, model, targets, pattern, density, schedule=None):
    """The exponential schedule: at every step re-score the masked network on fresh batches (scores
    from zero), tighten the masks, re-estimate BatchNorm statistics, record test accuracy.
    `schedule` overrides the densities (unstructured) or kept-per-group counts (N:M) of the steps."""
    args = ctx.args
    method = get_method(args.importance_type)
    options = dict(cli.method_options(args, method), score_mode=args.score_mode)
    batches = ctx.batches
    recalibrate = workflow.recalibrator(ctx)
    masks = us.all_kept(targets)
    if schedule is None and pattern is None:
        schedule = us.density_schedule(density, args.iterative_steps)
    elif schedule is None:
        schedule = us.nm_schedule(pattern[0], pattern[1], args.iterative_steps)
    steps, t_score, t_mask = [], 0.0, 0.0
    for i, target in enumerate(schedule):
        t0 = time.perf_counter()
        scores = us.weight_scores(args.importance_type, model, targets, masks,
                                  batches(args.iters_per_step), normalizer=args.normalizer,
                                  options=options)
        t1 = time.perf_counter()
        if pattern is None:
            masks = us.global_masks(scores, masks, target, args.max_layer_sparsity)
        else:
            masks = us.nm_masks(scores, masks, target, pattern[1])
        us.zero_pruned(targets, masks)
        t_score, t_mask = t_score + t1 - t0, t_mask + time.perf_counter() - t1
        step = {"step": i + 1, "density": us.density_report(masks)["density"],
                "test_acc_stale_bn": workflow.test_metrics(ctx, model)["top1"]}
        if pattern is None:
            step["target_density"] = target
        else:
            step["kept_per_group"] = f"{target}:{pattern[1]}"
        if recalibrate is not None:
            recalibrate(model)
        step["test_acc"] = workflow.test_metrics(ctx, model)["top1"]
        if args.ft_between_steps > 0 and i + 1 < len(schedule):
            us.apply_masks(targets, masks)
            cfg = TrainConfig(epochs=args.ft_between_steps, lr=args.sl_lr,
                              milestones=cli.default_milestones(args.ft_between_steps, None),
                              gamma=args.lr_gamma, momentum=args.momentum,
                              weight_decay=args.sl_weight_decay)
            train(model, ctx.loaders, cfg, ctx.device, ctx.out_dir / f"step{i + 1}.train.pth",
                  progress=args.progress, desc=f"fine-tune step {i + 1}")
            us.remove_masks(targets)
            step["test_acc_finetuned"] = workflow.test_metrics(ctx, model)["top1"]
        print(f"step {i + 1}/{len(schedule)}: density {step['density']:.4f}, "
              f"test acc {step['test_acc']:.2f}%", flush=True)
        steps.append(step)
    return masks, {"steps": steps, "seconds_importance": t_score, "seconds_masking": t_mask}


def export(ctx, model, masks, pattern, meta):
    """Folded state dict (.pth, loads into the dense architecture) and bitmask + values (.npz)."""
    out = ctx.out_dir
    state = model.state_dict()
    save_atomic({"format": FORMAT, "kind": "sparse_model", **meta, "state_dict": state,
                 "masks": masks}, out / "sparse_model.pth")
    sparse_bytes = us.export_sparse(state, masks, out / "sparse_model.npz",
                                    meta={"pattern": meta["pattern"], "arch": meta["arch"]})
    dense_bytes = sum(v.numel() * v.element_size() for v in state.values())
    back, back_masks, _ = us.import_sparse(out / "sparse_model.npz")
    roundtrip = set(back) == set(state) and all(
        torch.equal(back[k].to(state[k].dtype), state[k].cpu()) for k in state)
    info = {"dense_bytes": dense_bytes, "sparse_export_bytes": sparse_bytes,
            "compression": dense_bytes / sparse_bytes, "export_roundtrip": roundtrip}
    if pattern is not None:
        n, m = pattern
        info["pattern_verified_on_reload"] = all(
            us.check_nm(back_masks[k], n, m) and bool((back[k][~back_masks[k]] == 0).all())
            for k in masks if us.nm_compatible(back_masks[k].shape, m))
    return info


def main(argv=None):
    args = parse(argv)
    pattern, density = check_request(args)
    results_path = Path(args.output_dir) / "results.json"
    if args.resume and results_path.exists():
        print(f"{results_path} exists: this run is finished (delete it to run again)")
        return 0
    ctx = workflow.setup(args)
    if pattern is None:  # an unreachable target stops before the dense network is trained
        probe = get_model(args.model, ctx.loaders.num_classes)
        sizes = [t.tensor.numel() for t in
                 us.prunable_weights(probe, get_classifier(probe), args.prune_classifier).values()]
        us.check_reachable(sizes, density, args.max_layer_sparsity)
        del probe
    t_start = time.perf_counter()
    model = workflow.load_or_train_dense(ctx)
    test_acc_dense = workflow.test_metrics(ctx, model)["top1"]
    targets = us.prunable_weights(model, get_classifier(model), args.prune_classifier)
    dense_layers = ([n for n, t in targets.items() if not us.nm_compatible(t.tensor.shape, pattern[1])]
                    if pattern is not None else [])
    if dense_layers:
        print(f"left dense (input dimension not a multiple of {pattern[1]}): {', '.join(dense_layers)}")
    meta = {"arch": args.model, "num_classes": ctx.loaders.num_classes, "dataset": args.dataset,
            "pattern": args.pattern}

    init_path = ctx.out_dir / "pruned_init.pth"
    if args.resume and init_path.exists() and (ctx.out_dir / "finetune.train.pth").exists():
        saved = load_checkpoint(init_path)  # pruning finished; fine-tuning was interrupted
        model.load_state_dict(saved["state_dict"])
        masks = {n: saved["masks"][n].to(ctx.device) for n in targets}
        prune_info = saved["prune_info"]
    else:
        workflow.reseed(ctx)
        masks, prune_info = sparsify(ctx, model, targets, pattern, density)
        save_atomic({"format": FORMAT, "kind": "sparse_init", **meta, "state_dict": model.state_dict(),
                     "masks": masks, "prune_info": prune_info}, init_path)

    us.apply_masks(targets, masks)
    ft = workflow.finetune(ctx, model, ctx.out_dir, desc="fine-tune")
    us.remove_masks(targets)
    masked_zero = all(bool((t.tensor.detach()[~masks[n]] == 0).all()) for n, t in targets.items())
    test_acc = workflow.test_metrics(ctx, model)["top1"]
    report = us.density_report(masks)
    files = export(ctx, model, masks, pattern, meta)
    steps = prune_info["steps"]
    record = {
        "dataset": args.dataset, "model": args.model, "importance_type": args.importance_type,
        "pattern": args.pattern, "target_density": density, "achieved_density": report["density"],
        "kept_weights": report["kept"], "prunable_weights": report["total"],
        "layer_density": {n: v["density"] for n, v in report["layers"].items()},
        "layer_kept": {n: [v["kept"], v["total"]] for n, v in report["layers"].items()},
        "left_dense": dense_layers, "classifier_pruned": args.prune_classifier,
        "test_acc_dense": test_acc_dense, "steps": steps,
        "test_acc_pruned": steps[-1]["test_acc"], "test_acc_finetuned": test_acc,
        "val_acc_finetuned_best": ft["best_val_acc"], "masked_weights_zero": masked_zero,
        "seconds": {"importance": prune_info["seconds_importance"],
                    "masking": prune_info["seconds_masking"], "finetune": ft["seconds"],
                    "total": time.perf_counter() - t_start},
        "export": files, "seed": args.seed,
        "settings": cli.settings(args),
    }
    write_json(record, results_path)
    print(f"\n{args.importance_type} {args.pattern}: density {report['density']:.4f} "
          f"(target {density:g}, {report['kept']}/{report['total']} weights); test acc dense "
          f"{test_acc_dense:.2f}% | pruned {record['test_acc_pruned']:.2f}% | fine-tuned "
          f"{test_acc:.2f}%; export {files['sparse_export_bytes'] / 1e6:.2f} MB vs dense "
          f"{files['dense_bytes'] / 1e6:.2f} MB; importance estimation "
          f"{prune_info['seconds_importance']:.1f}s\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)

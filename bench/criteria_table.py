#!/usr/bin/env python
"""Compare pruning criteria on one pretrained network: accuracy right after pruning and after a short
fine-tune, achieved MACs / params ratios, and seconds spent estimating importance.

    python bench/criteria_table.py --models vgg19 resnet32 --ratios 0.5 0.2 \
        --methods Weight Taylor OBA C-OBD C-OBS Kron-OBD Kron-OBS Eigen --pretrain_epochs 8

Each model is trained once (or loaded from --save_path_prefix); every method and ratio restarts from
that dense network. The table is printed and written to <output_dir>/table.md and table.json.
"""
import argparse
import copy
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pruners import workflow  # noqa: E402
from pruners.driver import channel_widths  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import write_json  # noqa: E402


def parse(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    cli.add_common(p)
    cli.add_pruning(p)
    p.add_argument("--models", nargs="+", default=["vgg19", "resnet32"])
    p.add_argument("--methods", nargs="+",
                   default=["Weight", "Taylor", "OBA", "C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS", "Eigen"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2])
    p.add_argument("--pretrain_epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    # Short CPU settings of its own, not the published ones; milestones None: 50 % and 75 % of
    # the epochs (the workflow's fallback; the parsed --num_epochs is replaced by --pretrain_epochs).
    p.set_defaults(output_dir="outputs/criteria_table", save_path_prefix="checkpoints/criteria_table",
                   sl_num_epochs=2, lr=0.05, batch_size=64, progress=False, tensorboard=False,
                   milestones=None, sl_milestones=None, sl_lr=0.01, sl_weight_decay=5e-4,
                   iterative_steps=16, iters_per_step=10)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cli.check_ratios(args.ratios)
    rows = []
    for model_name in args.models:
        margs = copy.copy(args)
        margs.model = model_name
        margs.num_epochs = args.pretrain_epochs
        margs.importance_type = args.methods[0]
        base_out = args.output_dir
        margs.output_dir = os.path.join(base_out, model_name)
        ctx = workflow.setup(margs)
        dense = workflow.load_or_train_dense(ctx)
        dense_info = workflow.dense_record(ctx, dense)
        widths = channel_widths(dense)
        for method in args.methods:
            for ratio in args.ratios:
                run = copy.copy(margs)
                run.importance_type = method
                run.output_dir = os.path.join(base_out, model_name, method)
                rctx = dataclasses.replace(ctx, args=run,
                                           out_dir=workflow.check_writable(run.output_dir))
                t0 = time.perf_counter()
                try:
                    _, rec = workflow.prune_and_finetune(rctx, copy.deepcopy(dense), ratio,
                                                         dense_info, widths)
                except ValueError as err:  # e.g. a target a criterion cannot reach
                    rec = {"model": model_name, "importance_type": method, "target_ops_ratio": ratio,
                           "error": str(err)}
                rec["wall_seconds"] = time.perf_counter() - t0
                rows.append(rec)
                print(format_row(rec), flush=True)
    table = render(rows)
    print("\n" + table)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    write_json(rows, os.path.join(args.output_dir, "table.json"))
    return 0


HEADER = ("| model | method | target | MACs ratio | params ratio | acc dense | acc pruned, stale BN | "
          "acc pruned | acc fine-tuned | estimation s |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(r):
    if "error" in r:
        return f"| {r['model']} | {r['importance_type']} | {r['target_ops_ratio']} | error: {r['error']} |"
    return (f"| {r['model']} | {r['importance_type']} | {r['target_ops_ratio']:g} | "
            f"{r['achieved_ops_ratio']:.3f} | {r['achieved_params_ratio']:.3f} | "
            f"{r['test_acc_dense']:.2f} | {r['test_acc_pruned_stale_bn']:.2f} | {r['test_acc_pruned']:.2f} | "
            f"{r['test_acc_finetuned']:.2f} | "
            f"{r['seconds_importance']:.1f} |")


def render(rows):
    return "\n".join([HEADER] + [format_row(r) for r in rows])


if __name__ == "__main__":
    cli.run_main(main)

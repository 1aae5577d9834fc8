#!/usr/bin/env python
"""Iterative structured pruning: prune to each of the decreasing --ops_ratios in turn, fine-tuning in
between and continuing from the fine-tuned network. Ratios are relative to the dense network.
    python iterative_prune.py --importance_type OBA --dataset cifar10 --model resnet32 --ops_ratios 0.6 0.5 0.4
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pruners import workflow  # noqa: E402
from pruners.driver import channel_widths  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import load_pruned_model  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0], script="iterative_prune")
    cli.add_common(p)
    cli.add_pruning(p)
    p.add_argument("--ops_ratios", type=float, nargs="+", default=[0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
                   help="strictly decreasing fractions of the dense MACs to keep")
    return p


def main(argv=None):
    args = cli.parse(build_parser(), argv)
    cli.check_ratios(args.ops_ratios, decreasing=True)

    ctx = workflow.setup(args)
    model = workflow.load_or_train_dense(ctx)
    dense_info = workflow.dense_record(ctx, model)
    widths = channel_widths(model)  # caps stay relative to the dense network

    def one_target(target):  # continues from the previous target's fine-tuned network
        nonlocal model
        tdir = workflow.target_dir(ctx, target)
        if args.resume and (tdir / "results.json").exists():
            model = load_pruned_model(tdir / "pruned_model.pth", device=ctx.device)
            return json.loads((tdir / "results.json").read_text())
        model, record = workflow.prune_and_finetune(ctx, model, target, dense_info, widths)
        return record

    workflow.run_targets(ctx, args.ops_ratios, one_target)
    return 0


if __name__ == "__main__":
    cli.run_main(main)

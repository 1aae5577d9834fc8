#!/usr/bin/env python
"""One-shot structured pruning: dense network -> prune to each --ops_ratios target -> fine-tune.

Every target restarts from the dense network. Example:
    python train_prune.py --importance_type OBA --dataset cifar10 --model vgg19 --ops_ratios 0.14
"""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pruners import workflow  # noqa: E402
from pruners.driver import channel_widths  # noqa: E402
from utils import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0], script="train_prune")
    cli.add_common(p)
    cli.add_pruning(p)
    p.add_argument("--ops_ratios", type=float, nargs="+", default=[0.14],
                   help="fractions of the dense MACs to keep, one run per value")
    return p


def main(argv=None):
    args = cli.parse(build_parser(), argv)
    cli.check_ratios(args.ops_ratios)

    ctx = workflow.setup(args)
    dense = workflow.load_or_train_dense(ctx)
    dense_info = workflow.dense_record(ctx, dense)
    widths = channel_widths(dense)

    def one_target(target):
        done = workflow.target_dir(ctx, target) / "results.json"
        if args.resume and done.exists():
            return json.loads(done.read_text())
        return workflow.prune_and_finetune(ctx, copy.deepcopy(dense), target, dense_info, widths)[1]

    workflow.run_targets(ctx, args.ops_ratios, one_target)
    return 0


if __name__ == "__main__":
    cli.run_main(main)

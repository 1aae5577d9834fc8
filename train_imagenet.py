#!/usr/bin/env python
"""Fine-tune a saved (pruned) network on ImageNet, on one process or many (torchrun + DDP).

    torchrun --nproc_per_node 8 train_imagenet.py --save_dir <dir> --model_name <name>

Reads <save_dir>/<model_name>.pth (written by the pruning scripts), or builds the dense
torchvision network --model when that file does not exist. The ImageNet val folder is the
reported test set: nothing is selected on it, the last epoch is kept (the EMA weights with
--model-ema). Writes <model_name>_newest.pth every epoch (--resume continues from it),
<model_name>_finetuned.pth and <model_name>_finetuned.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utils import cli, finetune  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__.splitlines()[0] + " The ImageNet val folder is the reported test set: "
                   "nothing is selected on it, the last epoch (the EMA weights with --model-ema) "
                   "is kept.")
    g = p.add_argument_group("files")
    g.add_argument("--save_dir", required=True, help="folder of <model_name>.pth and all outputs")
    g.add_argument("--model_name", default="pruned_model",
                   help="file stem of the network to fine-tune: <save_dir>/<model_name>.pth")
    cli.add_data_model(p, default_model=None, default_dataset=None,
                       model_help="torchvision name of a dense network to fine-tune when "
                                  "<save_dir>/<model_name>.pth does not exist")
    cli.add_recipe(p)
    g = cli.add_run(p)
    g.add_argument("--test-only", dest="test_only", action="store_true",
                   help="evaluate on the test set (ImageNet val) and exit")
    g.add_argument("--stop_after_epochs", type=int, default=None,
                   help="stop after this many epochs in this run (e.g. a job time limit); "
                        "continue later with --resume")
    args = cli.parse(p, argv)
    return finetune.run(args)


if __name__ == "__main__":
    cli.run_main(main)

#!/usr/bin/env python
"""Prune a pretrained torchvision network on ImageNet to each --ops_ratios target (from the dense
network each time) and save it for fine-tuning with train_imagenet.py. Never trains the dense network.

    python prune_imagenet.py --importance_type OBA --model vit_b_16 --ops_ratios 0.51
    torchrun --nproc_per_node 8 prune_imagenet.py --importance_type OBA --model resnet50 --ops_ratios 0.5

Under torchrun every process scores its share of the --iters_per_step batches, scores are summed
over processes, and every process removes the same channels; only rank 0 writes files.
"""
import argparse
import copy
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pruners import workflow  # noqa: E402
from pruners.driver import channel_widths  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import save_pruned_model, write_json  # noqa: E402
from utils.distributed import decided, env_world_size  # noqa: E402
from utils.flops import format_count  # noqa: E402

def build_parser():
    # Published settings (350 importance batches per step of 2 images, 50 steps) come from
    # utils/recipes.py.
    p = cli.parser(__doc__.splitlines()[0], script="prune_imagenet")
    cli.add_loading(cli.add_data_model(p, default_model="vit_b_16", default_dataset="imagenet",
                                       default_weights="IMAGENET1K_V1"))
    g = cli.add_run(p)
    g.add_argument("--save_path_prefix", default="checkpoints",
                   help="root of the default --save_dir")
    cli.add_pruning(p)
    g = p.add_argument_group("ImageNet pruning")
    g.add_argument("--ops_ratios", type=float, nargs="+", default=[0.51],
                   help="fractions of the dense MACs to keep, one pruned network per value")
    g.add_argument("--importance_batch_size", type=int, default=cli.PUBLISHED,
                   help="images per importance batch, per process (--batch_size is used for "
                        "evaluation and BatchNorm re-estimation)")
    g.add_argument("--save_dir", default=None,
                   help="where the pruned networks go (default <save_path_prefix>/<dataset>/"
                        "<model>/<importance_type>)")
    g.add_argument("--model_name", default="pruned_model",
                   help="file stem: <save_dir>/<model_name>.pth (+ .json); with several "
                        "--ops_ratios, <model_name>_ops<ratio>")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="top-1 / top-5 on the val folder before and after pruning")
    # All of the training folder serves importance estimation (nothing is trained or selected);
    # --resume here means: skip the targets already saved.
    p.set_defaults(tensorboard=False, val_fraction=0.0)
    return p


def parse(argv):
    args = cli.parse(build_parser(), argv)
    cli.check_ratios(args.ops_ratios)
    names = [f"{r:g}" for r in args.ops_ratios]
    if len(set(names)) != len(names):
        raise cli.UsageError(f"--ops_ratios lists a target twice ({' '.join(names)}); give each once")
    processes = env_world_size()
    if processes > args.iters_per_step:
        raise cli.UsageError(f"{processes} processes but only --iters_per_step "
                             f"{args.iters_per_step} batches to share out; use at most "
                             f"{args.iters_per_step} processes or more batches")
    if not args.weights or args.weights.lower() == "none":
        raise cli.UsageError("prune_imagenet.py prunes pretrained networks: pass --weights with a "
                             "torchvision weights name or a local file")
    args.save_dir = args.save_dir or str(Path(args.save_path_prefix) / args.dataset / args.model /
                                         args.importance_type)
    args.output_dir, args.pretrained = args.save_dir, None
    return args


def finetune_command(args, name: str) -> str:
    """The exact command that fine-tunes the saved network on a node of 8 GPUs."""
    script = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "train_imagenet.py"))
    cmd = ["torchrun", "--nproc_per_node", "8", script, "--save_dir", args.save_dir,
           "--model_name", name]
    if args.data_root:
        cmd += ["--data_root", args.data_root]
    if args.dataset != "imagenet":
        cmd += ["--dataset", args.dataset]
    if args.image_size:
        cmd += ["--image_size", str(args.image_size)]
    return " ".join(shlex.quote(c) for c in cmd)


def main(argv=None):
    args = parse(argv)
    ctx = workflow.setup(args, importance_batch_size=args.importance_batch_size, multi_process=True,
                         output_flag="--save_dir")
    dense = workflow.load_pretrained(ctx)
    dense_info = workflow.dense_record(ctx, dense, measure=args.eval)
    widths = channel_widths(dense)
    save_dir = Path(args.save_dir)

    def one_target(target):
        name = args.model_name if len(args.ops_ratios) == 1 else f"{args.model_name}_ops{target:g}"
        done = save_dir / f"{name}.json"
        # rank 0 looks at the files, so every process takes the same branch
        finished = decided(lambda: json.loads(done.read_text()) if args.resume and done.exists()
                           and (save_dir / f"{name}.pth").exists() else None)
        if finished is not None:
            return finished
        model, info = workflow.prune_and_measure(ctx, copy.deepcopy(dense), target,
                                                 dense_info["macs"], widths, measure=args.eval)
        record = workflow.pruned_record(ctx, model, target, dense_info, info)
        record.update(model_file=str(save_dir / f"{name}.pth"),
                      finetune_command=finetune_command(args, name))
        if ctx.is_main:
            save_pruned_model(model, save_dir / f"{name}.pth", results=record, arch=args.model,
                              dataset=args.dataset, num_classes=ctx.loaders.num_classes,
                              image_size=ctx.loaders.image_size, model_kwargs=workflow.model_kwargs(args))
            write_json(record, done)
            print(f"saved {save_dir / f'{name}.pth'} ({format_count(record['pruned_macs'])} MACs, "
                  f"ratio {record['achieved_ops_ratio']:.3f}); fine-tune it with:\n  "
                  f"{record['finetune_command']}", flush=True)
        return record

    workflow.run_targets(ctx, args.ops_ratios, one_target, save_dir / f"{args.model_name}_summary.json")
    return 0


if __name__ == "__main__":
    cli.run_main(main)

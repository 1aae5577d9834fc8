#!/usr/bin/env python
"""Test accuracy without fine-tuning of unstructured and N:M sparsity, per criterion and density.

    OMP_NUM_THREADS=1 python bench/unstructured_table.py --model resnet20 --num_epochs 10 \
        --methods OBA fastOBA Taylor Weight Random C-OBD C-OBS --densities 0.5 0.2 0.1 0.05 --patterns 2:4

The dense network is trained once (or loaded from --save_path_prefix); every criterion and target
restarts from it and runs the schedule of train_unstructured_prune.py (--iterative_steps,
--iters_per_step, BatchNorm re-estimation) without fine-tuning. The table is printed and written to
<output_dir>/table.md and table.json.
"""
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import get_classifier  # noqa: E402
from pruners import unstructured as us  # noqa: E402
from pruners import workflow  # noqa: E402
from utils import cli  # noqa: E402
from utils.checkpoint import write_json  # noqa: E402
from utils.engine import evaluate, seed_everything  # noqa: E402

import train_unstructured_prune as script  # noqa: E402


def parse(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    cli.add_common(p)
    cli.add_pruning(p)
    p.add_argument("--methods", nargs="+",
                   default=["OBA", "fastOBA", "Taylor", "Weight", "Random", "C-OBD", "C-OBS"])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    p.add_argument("--patterns", nargs="*", default=["2:4"])
    p.add_argument("--prune_classifier", action="store_true")
    p.add_argument("--max_layer_sparsity", type=float, default=0.99)
    p.set_defaults(output_dir="outputs/unstructured_table", num_epochs=10, lr=0.05, batch_size=64,
                   iterative_steps=8, iters_per_step=4, bn_recalibration_batches=8, progress=False,
                   tensorboard=False, ft_between_steps=0)
    args = p.parse_args(argv)
    cli.check_ratios(args.densities, flag="--densities")
    for pat in args.patterns:
        us.parse_pattern(pat)
    return args


def main(argv=None):
    args = parse(argv)
    ctx = workflow.setup(args)
    dense = workflow.load_or_train_dense(ctx)
    dense_acc = evaluate(dense, ctx.loaders.test, ctx.device)[1]
    columns = [f"{d:g}" for d in args.densities] + list(args.patterns)
    rows = {}
    for method in args.methods:
        args.importance_type = method
        rows[method] = {}
        for col in columns:
            pattern = us.parse_pattern(col) if ":" in col else None
            density = pattern[0] / pattern[1] if pattern else float(col)
            model = copy.deepcopy(dense)
            layers = us.prunable_layers(model, get_classifier(model), args.prune_classifier)
            seed_everything(args.seed)
            t0 = time.perf_counter()
            _, info = script.sparsify(ctx, model, layers, pattern, density)
            rows[method][col] = {"test_acc": info["steps"][-1]["test_acc"],
                                 "density": info["steps"][-1]["density"],
                                 "seconds": time.perf_counter() - t0}
            print(f"{method} {col}: {rows[method][col]['test_acc']:.2f}% "
                  f"(density {rows[method][col]['density']:.4f})", flush=True)
    lines = [f"dense {args.model} on {args.dataset}: test acc {dense_acc:.2f}%; test acc (%) without "
             "fine-tuning at each density (fraction of conv/linear weights kept, classifier dense)", "",
             "| criterion | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in rows.items():
        lines.append(f"| {method} | " + " | ".join(f"{row[c]['test_acc']:.2f}" for c in columns) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    (ctx.out_dir / "table.md").write_text(table + "\n")
    write_json({"dense_test_acc": dense_acc, "rows": rows,
                "settings": {k: v for k, v in vars(args).items()
                             if isinstance(v, (int, float, str, bool, list)) or v is None}},
               ctx.out_dir / "table.json")
    return 0


if __name__ == "__main__":
    cli.run_main(main)

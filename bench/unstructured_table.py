#!/usr/bin/env python
"""Test accuracy without fine-tuning of unstructured and N:M sparsity, per criterion and density.

    OMP_NUM_THREADS=1 python bench/unstructured_table.py --model resnet20 --num_epochs 10 \
        --methods OBA fastOBA Taylor Weight Random C-OBD C-OBS --densities 0.5 0.2 0.1 0.05 --patterns 2:4

The dense network is trained once (or loaded from --save_path_prefix). Per criterion, one
unstructured run goes down through every density of --densities (--steps_between exponential steps
from one to the next, as in train_unstructured_prune.py: fresh scores on --iters_per_step batches
of the masked network, BatchNorm re-estimation) and the test accuracy without fine-tuning is read
at each of them; every --patterns entry is its own run from the dense network (M:M -> N:M over
--iterative_steps). The table is printed and written to
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
    p.add_argument("--steps_between", type=int, default=2,
                   help="exponential steps from one density to the next")
    p.add_argument("--patterns", nargs="*", default=["2:4"])
    p.add_argument("--prune_classifier", action="store_true")
    p.add_argument("--max_layer_sparsity", type=float, default=0.99)
    p.set_defaults(output_dir="outputs/unstructured_table", num_epochs=10, lr=0.05, batch_size=64,
                   iterative_steps=2, iters_per_step=4, bn_recalibration_batches=8, progress=False,
                   tensorboard=False, ft_between_steps=0,
                   milestones=None)  # 50 % and 75 % of --num_epochs, as the table was measured
    args = p.parse_args(argv)
    cli.check_ratios(args.densities, decreasing=True, flag="--densities")
    for pat in args.patterns:
        us.parse_pattern(pat)
    return args


def main(argv=None):
    args = parse(argv)
    ctx = workflow.setup(args)
    dense = workflow.load_or_train_dense(ctx)
    dense_acc = evaluate(dense, ctx.loaders.test, ctx.device)[1]
    columns = [f"{d:g}" for d in args.densities] + list(args.patterns)
    schedule, previous = [], 1.0
    for d in args.densities:
        schedule += [previous * (d / previous) ** (s / args.steps_between)
                     for s in range(1, args.steps_between)] + [d]
        previous = d
    rows = {}
    for method in args.methods:
        args.importance_type = method
        rows[method] = {}
        runs = [(None, schedule)] + [(us.parse_pattern(p), None) for p in args.patterns]
        for pattern, steps in runs:
            model = copy.deepcopy(dense)
            targets = us.prunable_weights(model, get_classifier(model), args.prune_classifier)
            seed_everything(args.seed)
            t0 = time.perf_counter()
            density = args.densities[-1] if pattern is None else pattern[0] / pattern[1]
            _, info = script.sparsify(ctx, model, targets, pattern, density, schedule=steps)
            seconds = time.perf_counter() - t0
            if pattern is None:
                for col, d in zip(columns, args.densities):
                    step = next(s for s in info["steps"] if abs(s["target_density"] - d) < 1e-12)
                    rows[method][col] = {"test_acc": step["test_acc"], "density": step["density"]}
            else:
                col = f"{pattern[0]}:{pattern[1]}"
                rows[method][col] = {"test_acc": info["steps"][-1]["test_acc"],
                                     "density": info["steps"][-1]["density"]}
            shown = columns[:len(args.densities)] if pattern is None else [col]
            print(f"{method}: " + ", ".join(f"{c} {rows[method][c]['test_acc']:.2f}%" for c in shown)
                  + f" ({seconds:.0f}s)", flush=True)
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

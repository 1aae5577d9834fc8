#!/usr/bin/env python
"""Compare pruning criteria: criteria x targets x seeds on one dataset and model, from one shared
dense network; writes results.csv, results.json, a Table-1-style table.md and plots.

    python compare.py --dataset digits --model resnet32 --criteria OBA Taylor Kron-OBS Eigen \
        --targets 0.5 0.3 0.2 --seeds 0 1 2 --jobs 2 -- --num_epochs 15 --sl_num_epochs 3

Flags after `--` go to the pruning script of --mode unchanged (train_prune.py for oneshot,
iterative_prune.py for iterative, train_unstructured_prune.py for unstructured, where the targets
are weight densities); without them the scripts' own (published) defaults apply.

--variants turns the grid into an ablation: each `label='flags'` adds those flags to the cells of
every criterion, as a series of its own named <criterion>@<label>:

    python compare.py --model resnet32 --criteria OBA --targets 0.2 --seeds 0 \
        --variants base= eval='--score_mode eval' nonorm='--normalizer none' -- --sl_num_epochs 0

The dense network is trained once (in <output_dir>/dense/, resumable) and shared by every cell;
Slim gets its own, trained with --sparsity_l1 --slim_l1. A cell is one (criterion, target, seed)
and lives in <output_dir>/cells/<criterion>/seed<k>/; a finished cell (its results.json exists)
is never run again, an interrupted one restarts cleanly (the scripts' --resume), a failed one is
recorded and retried only with --retry_failed. Each script process runs with OMP threads =
available cores / --jobs. --collect_only runs nothing and writes the files from the cells
finished so far.
"""
import argparse
import csv
import importlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utils import cli  # noqa: E402
from utils.checkpoint import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent
SCRIPTS = {"oneshot": "train_prune.py", "iterative": "iterative_prune.py",
           "unstructured": "train_unstructured_prune.py"}
# The runner sets these itself; passing them after `--` would split the grid's bookkeeping.
OWN_FLAGS = ("--dataset", "--model", "--importance_type", "--seed", "--output_dir", "--ops_ratios",
             "--pruning_ratio", "--save_path_prefix", "--resume", "--no-resume", "--sparsity_l1")
CSV_COLUMNS = ("model", "dataset", "mode", "criterion", "importance_type", "variant_flags", "target", "seed", "status", "error",
               "achieved_ops_ratio", "achieved_params_ratio", "achieved_density", "test_acc_dense",
               "test_acc_pruned", "test_acc_finetuned", "test_loss_pruned", "seconds_importance",
               "seconds_finetune", "wall_seconds", "result_path")


def parse(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command_line = shlex.join(argv)  # quoted as typed, so the table's command can be pasted
    script_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--mode", default="oneshot", choices=sorted(SCRIPTS))
    p.add_argument("--criteria", nargs="+", default=["OBA", "Taylor", "Kron-OBS", "Eigen"],
                   help="importance types (see --importance_type of the scripts)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.2],
                   help="MACs ratios to keep (oneshot / iterative) or weight densities "
                        "(unstructured)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output_dir", default=None,
                   help="default: outputs/compare/<dataset>_<model>_<mode>")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
    p.add_argument("--slim_l1", type=float, default=1e-4,
                   help="L1 on BatchNorm scales for Slim's own dense network")
    p.add_argument("--variants", nargs="+", default=None, metavar="LABEL=FLAGS",
                   help="ablation: every criterion once per variant, with FLAGS added to its cells "
                        "(e.g. base= eval='--score_mode eval')")
    p.add_argument("--retry_failed", action="store_true", help="run failed cells again")
    p.add_argument("--collect_only", action="store_true",
                   help="run nothing: gather the finished cells into results.csv/json, table.md "
                        "and plots (cells not run are listed as 'not run'), e.g. while another "
                        "runner is still working on the grid")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=False,
                   help="also time dense and pruned networks on CPU (bench/latency.py) and plot it")
    p.add_argument("--layers_target", type=float, default=None,
                   help="target of the channels-per-layer plot (default: the smallest)")
    args = p.parse_args(argv)
    args.script_args = script_args
    args.command_line = command_line
    check(args)
    return args


def check(args) -> None:
    from pruners.registry import get_method
    for name in args.criteria:
        get_method(name)  # an unknown name is a one-line usage error
    if len(set(args.criteria)) != len(args.criteria) or len(set(args.seeds)) != len(args.seeds):
        raise cli.UsageError("--criteria and --seeds must not repeat a value")
    cli.check_ratios(args.targets, flag="--targets")
    if len(set(args.targets)) != len(args.targets):
        raise cli.UsageError("--targets must not repeat a value")
    if args.mode == "iterative":  # every target continues from the previous one
        args.targets = sorted(args.targets, reverse=True)
    if args.jobs < 1:
        raise cli.UsageError(f"--jobs must be at least 1, got {args.jobs}")
    own = own_flags(args.script_args)
    if own:
        raise cli.UsageError(f"{own[0]} after `--` is set by compare.py itself; use "
                             "compare.py's own flags (--dataset --model --criteria --targets "
                             "--seeds --output_dir)")
    if args.output_dir is None:
        args.output_dir = f"outputs/compare/{args.dataset}_{args.model}_{args.mode}"
    args.series = series_of(args)


def own_flags(argv) -> list:
    """The flags in `argv` that the runner sets itself."""
    return [a.split("=")[0] for a in argv if a.split("=")[0] in OWN_FLAGS]


def series_of(args) -> dict:
    """{series name: (importance type, extra script flags)}, in the order the table lists them."""
    if not args.variants:
        return {c: (c, []) for c in args.criteria}
    variants = {}
    for spec in args.variants:
        label, sep, flags = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", label) or label in variants:
            raise cli.UsageError(f"--variants '{spec}': give LABEL=FLAGS with a distinct label of "
                                 "letters, digits, _ . + - (e.g. eval='--score_mode eval')")
        variants[label] = shlex.split(flags)
        if own_flags(variants[label]):
            raise cli.UsageError(f"--variants '{spec}' sets a flag compare.py sets itself")
    return {f"{c}@{label}": (c, flags) for c in args.criteria for label, flags in variants.items()}


# ----------------------------------------------------------------------------- the dense network

def base_args(args, criterion: str, extra=()):
    """The parsed settings of one script run (validates the flags after `--` before anything
    runs, with the scripts' own one-line errors)."""
    out = Path(args.output_dir)
    argv = list(args.script_args) + list(extra) + [
        "--dataset", args.dataset, "--model", args.model, "--importance_type", criterion,
        "--save_path_prefix", str(out / "dense"), "--output_dir", str(out / "dense")]
    if criterion == "Slim":
        argv += ["--sparsity_l1", f"{args.slim_l1:g}"]
    if args.mode == "unstructured":
        import train_unstructured_prune
        return train_unstructured_prune.parse(argv)
    script = importlib.import_module(Path(SCRIPTS[args.mode]).stem)
    return cli.parse(script.build_parser(), argv)


def prepare_dense(args) -> None:
    """Train (or resume training) every dense network the cells need, once, before any cell runs,
    so that parallel cells never race to train it."""
    from pruners import workflow
    wanted = {}
    for criterion, extra in args.series.values():  # one dense network per checkpoint stem
        dargs = base_args(args, criterion, extra)
        wanted.setdefault(workflow.dense_paths(dargs)[0], dargs)
    for final, dargs in wanted.items():
        if final.exists():
            continue
        print(f"dense network {final}: training", flush=True)
        dargs.resume = workflow.dense_paths(dargs)[1].exists()
        ctx = workflow.setup(dargs)
        workflow.load_or_train_dense(ctx)


# ----------------------------------------------------------------------------- cells

def cell_dir(args, criterion: str, seed: int) -> Path:
    return Path(args.output_dir) / "cells" / criterion / f"seed{seed}"


def target_dir(args, criterion: str, seed: int, target: float) -> Path:
    prefix = "density" if args.mode == "unstructured" else "ops"
    return cell_dir(args, criterion, seed) / f"{prefix}_{target:g}"


def failure_path(args, criterion, seed, target) -> Path:
    return cell_dir(args, criterion, seed) / f"failed_{target:g}.json"


def pending(args, criterion: str, seed: int) -> list:
    todo = []
    for t in args.targets:
        if (target_dir(args, criterion, seed, t) / "results.json").exists():
            continue
        if failure_path(args, criterion, seed, t).exists() and not args.retry_failed:
            continue
        todo.append(t)
    return todo


def command(args, name: str, seed: int, targets: list) -> tuple:
    """(argv, output folder) of one script process covering `targets` of a (series, seed)."""
    criterion, extra = args.series[name]
    out = cell_dir(args, name, seed)
    script = SCRIPTS[args.mode]
    if args.mode == "unstructured":  # one density per process, each in its own folder
        out = target_dir(args, name, seed, targets[0])
        spec = ["--pruning_ratio", f"{targets[0]:g}"]
    else:  # iterative: always the whole chain; finished targets are skipped by --resume
        chain = args.targets if args.mode == "iterative" else targets
        spec = ["--ops_ratios"] + [f"{t:g}" for t in chain]
    argv = [sys.executable, str(ROOT / script), *args.script_args, *extra, "--dataset", args.dataset,
            "--model", args.model, "--importance_type", criterion, "--seed", str(seed),
            "--save_path_prefix", str(Path(args.output_dir) / "dense"), "--output_dir", str(out),
            *spec, "--no-progress"]
    if criterion == "Slim":
        argv += ["--sparsity_l1", f"{args.slim_l1:g}"]
    if out.is_dir() and any(out.rglob("*.pth")):
        argv.append("--resume")  # an interrupted cell continues from its last checkpoint
    return argv, out


def jobs_of(args) -> list:
    """One job per process to start: (criterion, seed, targets it covers)."""
    jobs = []
    for criterion in args.series:
        for seed in args.seeds:
            todo = pending(args, criterion, seed)
            if not todo:
                continue
            if args.mode == "unstructured":
                jobs += [(criterion, seed, [t]) for t in todo]
            else:
                jobs.append((criterion, seed, todo))
    return jobs


def record_failures(args, criterion, seed, targets, log_path: Path, code: int) -> None:
    """A process that ended without results for some of its targets: the first target without
    results failed (the scripts stop at the first failure); the others are left to the next job."""
    missing = [t for t in targets if not (target_dir(args, criterion, seed, t) / "results.json").exists()]
    if not missing:
        return
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.exists() else []
    errors = [ln for ln in lines if ": error: " in ln]
    message = (errors[-1].split(": error: ", 1)[1] if errors else
               (lines[-1] if lines else f"exit code {code}"))
    write_json({"criterion": criterion, "seed": seed, "target": missing[0], "exit_code": code,
                "error": message, "log": str(log_path)},
               failure_path(args, criterion, seed, missing[0]))
    print(f"  failed: {criterion} seed {seed} target {missing[0]:g}: {message}", flush=True)


def run_cells(args) -> None:
    """Run every pending job, --jobs at a time, until nothing is pending. A job that fails on one
    target leaves its later targets pending; they get a fresh process in the next round."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    running = []  # (process, job, log path, log file, start time)
    try:
        while True:
            queue = jobs_of(args)
            busy = {(c, s) for _, (c, s, _), *_ in running}
            queue = [j for j in queue if (j[0], j[1]) not in busy]
            if not queue and not running:
                return
            while queue and len(running) < args.jobs:
                criterion, seed, targets = queue.pop(0)
                argv, out = command(args, criterion, seed, targets)
                out.mkdir(parents=True, exist_ok=True)
                log_path = out / "log.txt"
                log = open(log_path, "a")
                log.write(f"\n$ {' '.join(argv)}\n")
                log.flush()
                print(f"start: {criterion} seed {seed} targets "
                      f"{' '.join(f'{t:g}' for t in targets)}", flush=True)
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=os.getcwd(), start_new_session=True)
                running.append((proc, (criterion, seed, targets), log_path, log, time.time()))
            time.sleep(0.5)
            for item in list(running):
                proc, (criterion, seed, targets), log_path, log, t0 = item
                code = proc.poll()
                if code is None:
                    continue
                running.remove(item)
                log.close()
                if code in (130, 143, -signal.SIGINT, -signal.SIGTERM):
                    raise KeyboardInterrupt  # a cell was stopped from outside: stop the grid too
                record_failures(args, criterion, seed, targets, log_path, code)
                print(f"done: {criterion} seed {seed} ({time.time() - t0:.0f}s, exit {code})",
                      flush=True)
    finally:
        for proc, *_rest in running:  # children stop like a Ctrl-C: their checkpoints stay intact
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _job, _path, log, _t0 in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


# ----------------------------------------------------------------------------- results

def cell_row(args, criterion, seed, target) -> dict:
    importance, extra = args.series[criterion]
    row = {"model": args.model, "dataset": args.dataset, "mode": args.mode, "criterion": criterion,
           "importance_type": importance, "variant_flags": " ".join(extra), "target": target,
           "seed": seed}
    path = target_dir(args, criterion, seed, target) / "results.json"
    if not path.exists():
        failed = failure_path(args, criterion, seed, target)
        if not failed.exists():
            return {**row, "status": "not run", "error": None}
        return {**row, "status": "failed", "error": json.loads(failed.read_text())["error"]}
    r = json.loads(path.read_text())
    # relative to the output folder, so the folder can be moved or committed as a whole
    row.update(status="done", error=None, result_path=str(path.relative_to(args.output_dir)),
               test_acc_dense=r.get("test_acc_dense"), test_acc_pruned=r.get("test_acc_pruned"),
               test_acc_finetuned=r.get("test_acc_finetuned"),
               test_loss_pruned=r.get("test_loss_pruned"))
    if args.mode == "unstructured":
        seconds = r.get("seconds", {})
        row.update(achieved_density=r["achieved_density"],
                   achieved_params_ratio=r["achieved_density"],
                   seconds_importance=seconds.get("importance"),
                   seconds_finetune=seconds.get("finetune"), wall_seconds=seconds.get("total"),
                   layer_keep_fraction=r.get("layer_density", {}))
    else:
        row.update(achieved_ops_ratio=r["achieved_ops_ratio"],
                   achieved_params_ratio=r["achieved_params_ratio"],
                   seconds_importance=r.get("seconds_importance"),
                   seconds_finetune=r.get("seconds_finetune"),
                   wall_seconds=sum(r.get(k) or 0.0 for k in
                                    ("seconds_importance", "seconds_pruning", "seconds_finetune")),
                   layer_keep_fraction=r.get("layer_keep_fraction", {}),
                   layer_order=r.get("layer_order"))
    return row


def collect(args) -> list:
    return [cell_row(args, c, s, t) for c in args.series for t in args.targets for s in args.seeds]


def write_results(args, rows) -> None:
    from utils.checkpoint import write_text
    from utils.plots import summary_table
    out = Path(args.output_dir)
    write_json(rows, out / "results.json")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(text.getvalue(), out / "results.csv")
    settings = shlex.join(args.script_args) or "(the script's defaults)"
    table = (f"# {args.dataset} {args.model}, {args.mode}\n\nCommand: `python compare.py "
             f"{args.command_line}`\n\nScript settings: `{settings}`\n\n" + summary_table(rows))
    write_text(table + "\n", out / "table.md")
    print("\n" + summary_table(rows))


def main(argv=None):
    args = parse(argv)
    out = Path(args.output_dir)
    from utils.checkpoint import check_writable
    for criterion, extra in args.series.values():  # flags checked before anything is written
        base_args(args, criterion, extra)
    check_writable(out, "--output_dir")
    if not args.collect_only:
        prepare_dense(args)
        run_cells(args)
    rows = collect(args)
    write_results(args, rows)
    latency = None
    if args.latency:
        latency = out / "latency.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "latency.py"), "--grid", str(out),
                        "--devices", "cpu", "--json", str(latency)], check=True)
    if args.plots:
        from utils.plots import make_plots
        for path in make_plots(out, latency=latency, layers_target=args.layers_target):
            print(f"plot: {path}")
    done = sum(r["status"] == "done" for r in rows)
    print(f"\n{done}/{len(rows)} cells done; results in {out}/results.csv, table {out}/table.md")
    # cells left unrun are a failure of a run, not of --collect_only
    return 0 if done == len(rows) or (args.collect_only and
                                      all(r["status"] != "failed" for r in rows)) else 1


if __name__ == "__main__":
    cli.run_main(main, resume_hint="run the same command again to continue (finished cells are kept)")

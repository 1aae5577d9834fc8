#!/usr/bin/env python
"""Seconds per importance step with 1 and N processes (torchrun), and the speed-up.

One importance step = `--batches` batches of `--batch_size` synthetic images scored by a criterion
(the batches shared out over the processes, scores all-reduced), exactly as prune_imagenet.py does.
On CPU the processes use gloo and split the cores (threads per process = cores / processes), so
the comparison holds the machine constant; on GPUs (`--device cuda`) each process has a GPU.

    python bench/distributed_scoring.py                          # resnet50, vit_b_16; 1 vs 2 CPU processes
    python bench/distributed_scoring.py --device cuda --procs 1 8 --image_size 224 --batch_size 32
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(args) -> None:
    """Runs under torchrun: time `--repeats` importance steps, rank 0 writes the median."""
    import torch
    from torch.utils.data import TensorDataset

    from models import get_model
    from pruners.registry import get_method
    from utils.data import BatchStream
    from utils.distributed import barrier, init_distributed

    info = init_distributed(args.device)
    torch.manual_seed(0)
    kwargs = {"image_size": args.image_size} if args.model.startswith("vit_") else {}
    model = get_model(args.model, 10, **kwargs).to(info.device)
    if hasattr(model, "heads"):  # a zero-initialised ViT head would make every score zero
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    count = args.batches * args.batch_size
    data = TensorDataset(torch.randn(count, 3, args.image_size, args.image_size),
                         torch.randint(0, 10, (count,)))
    stream = BatchStream(data, args.batch_size, seed=0)
    method = get_method(args.criterion)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(args.repeats + 1):  # the first step warms up
        batches = [(x.to(info.device), y.to(info.device)) for x, y in stream(args.batches)]
        barrier()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        method.estimate(model, batches, loss_fn)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        barrier()
        times.append(time.perf_counter() - start)
    if info.is_main:
        steady = sorted(times[1:])
        Path(args.out).write_text(json.dumps({"seconds": steady[len(steady) // 2]}))


def launch(args, model: str, procs: int) -> float:
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // procs)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), __file__, "--worker", "--out", str(out),
               "--model", model, "--criterion", args.criterion, "--device", args.device,
               "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
               "--batches", str(args.batches), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{model} with {procs} processes failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())["seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--criterion", default="OBA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--batches", type=int, default=8, help="batches per importance step (all processes)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.criterion}, {args.batches} batches x {args.batch_size} images at "
          f"{args.image_size} px per step, device {args.device}, {os.cpu_count()} cores\n")
    header = "| model | " + " | ".join(f"{n} proc s/step" for n in args.procs) + " | speed-up |"
    print(header)
    print("|" + "---|" * (len(args.procs) + 2))
    for model in args.models:
        secs = [launch(args, model, n) for n in args.procs]
        row = " | ".join(f"{s:.2f}" for s in secs)
        print(f"| {model} | {row} | {secs[0] / secs[-1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

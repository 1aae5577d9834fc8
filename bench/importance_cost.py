"""Cost of one importance batch relative to one training step.

    python bench/importance_cost.py                      # CPU: vgg19, resnet32 (b64), vit_b_16 (b2)
    python bench/importance_cost.py --device cuda        # CUDA: vit_b_16 at batch 32
    python bench/importance_cost.py --models resnet32 --repeats 9 --threads 2

For every model it times, interleaved round-robin after one warm-up call each:
  train    forward + backward + zero_grad (no optimiser step)
  Taylor   θ ⊙ g (one forward, one backward)
  OBA      θ ⊙ H̃θ (pruners.oba.oba_batch_scores)
  fastOBA2 θ ⊙ Hθ  (pruners.fastoba.fastoba_batch_scores, order 2)
  nested2  θ ⊙ Hθ by plain double backward through the full gradient (the reference fastOBA(2)
           is measured against; pruners.fastoba.nested_scores)
and prints median seconds per batch and the ratio to the training step. All in train mode.

Peak memory per method:
  CUDA: torch.cuda.max_memory_allocated during one call minus the memory allocated before it.
  CPU:  peak resident set size of a fresh process running one call: the kernel's high-water mark
        (VmHWM) is reset through /proc/self/clear_refs after the model and batch are built, and
        the reported figure is VmHWM after the call minus VmRSS before it. It includes allocator
        caching and anything else the process touched, so it is an upper bound on tensor memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from models import get_model  # noqa: E402
from pruners.fastoba import fastoba_batch_scores, nested_scores  # noqa: E402
from pruners.oba import oba_batch_scores  # noqa: E402

METHODS = ("train", "Taylor", "OBA", "fastOBA2", "nested2")
RESOLUTION = {"vit_b_16": 224, "resnet50": 224}


def default_batch(model_name: str, device: str) -> int:
    if RESOLUTION.get(model_name, 32) == 224:
        return 32 if device.startswith("cuda") else 2
    return 64


def build(model_name: str, batch_size: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = get_model(model_name, 10).to(device).train()
    size = RESOLUTION.get(model_name, 32)
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return model, x, y


def make_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]

    def train():
        loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def taylor():
        grads = torch.autograd.grad(loss_fn(model(x), y), params)
        return [p.detach() * g for p, g in zip(params, grads)]

    return {"train": train, "Taylor": taylor,
            "OBA": lambda: oba_batch_scores(model, x, y, loss_fn),
            "fastOBA2": lambda: fastoba_batch_scores(model, x, y, loss_fn, order=2),
            "nested2": lambda: nested_scores(model, x, y, loss_fn, order=2)}


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(model_name, batch_size, device, repeats, methods):
    model, x, y = build(model_name, batch_size, device)
    steps = make_steps(model, x, y)
    times = {m: [] for m in methods}
    for m in methods:  # warm-up
        steps[m]()
    for _ in range(repeats):
        for m in methods:
            _sync(device)
            start = time.perf_counter()
            steps[m]()
            _sync(device)
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(model_name, batch_size, device, method) -> float:
    """Peak memory of one call of `method` (see module docstring for what is measured)."""
    model, x, y = build(model_name, batch_size, device)
    step = make_steps(model, x, y)[method]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) / 1024


def memory_in_subprocess(model_name, batch_size, device, method, threads) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory_probe", model_name, method,
           "--device", device, "--batch_size", str(batch_size)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["vgg19", "resnet32", "vit_b_16"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per method (default 5; 2 for 224 px models on CPU)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="override every model's batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="what to time (train is always included: ratios are to it)")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--_memory_probe", nargs=2, metavar=("MODEL", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_probe:
        name, method = args._memory_probe
        batch = args.batch_size or default_batch(name, args.device)
        print(json.dumps({"peak_mib": peak_memory_mib(name, batch, args.device, method)}))
        return

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    header = f"{'model':10} {'batch':>5} {'method':9} {'median s':>9} {'x train':>8} " \
             f"{'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        batch = args.batch_size or default_batch(name, args.device)
        repeats = args.repeats or (2 if RESOLUTION.get(name) == 224 and args.device == "cpu"
                                   else 5)
        methods = ["train"] + [m for m in args.methods if m != "train"]
        medians = time_methods(name, batch, args.device, repeats, methods)
        for m in methods:
            mem = "-" if args.no_memory else \
                f"{memory_in_subprocess(name, batch, args.device, m, args.threads):9.0f}"
            print(f"{name:10} {batch:5d} {m:9} {medians[m]:9.3f} "
                  f"{medians[m] / medians['train']:8.2f} {mem:>9}", flush=True)
    print("peak MiB: " + ("CUDA max_memory_allocated during one call above the allocation "
                          "before it" if args.device.startswith("cuda") else
                          "peak RSS (VmHWM, reset via /proc/self/clear_refs) of a fresh process "
                          "during one call above its RSS before it"))


if __name__ == "__main__":
    main()

"""Cost of every importance criterion relative to one training step.

    python bench/importance_cost.py                        # CPU: vgg19 and resnet32, batch 64
    python bench/importance_cost.py --models resnet32 --repeats 3 --threads 2 --json out.json
    python bench/importance_cost.py --device cuda --methods OBA Kron-OBS

Every criterion runs through the registry, as the pruning driver calls it:
get_method(name).score(model, [(x, y)], CrossEntropyLoss()) in train mode. `train` is one
forward + backward + zero_grad (no optimiser step); every ratio is to it.

The K-FAC family (C-OBD, C-OBS, Kron-OBD, Kron-OBS, Eigen) has two costs, reported apart:
  per batch  collect_kfac_statistics with the options the criterion passes (factors, θA,
             per-example squares): paid on every importance batch;
  per step   what the criterion does with the statistics (inverses, eigendecompositions, the
             scores): paid once per pruning step, whatever the number of batches. Timed as the
             criterion's own score call with the statistics handed in ready; for Eigen, the
             eigenbases of every layer its structured pruning builds.
The other criteria have only a per-batch cost.

Timing: one first call per method (it also measures memory, below), then `--repeats` rounds,
round-robin over the methods, of the per-batch part; the median is reported. The per-step part
is timed `--step_repeats` times (median).

Peak memory of one first call (the whole criterion: statistics and per-step part), above what
was allocated before it, and as a multiple of the training step's:
  CUDA  torch.cuda.max_memory_allocated, reset before the call (after one untimed training step,
        so cuBLAS/cuDNN workspaces, allocated once, count nowhere);
  CPU   the peak of live tensor storage bytes created during the call, followed op by op with a
        TorchDispatchMode (storages tracked by weak reference, so frees are seen). Deterministic;
        it counts tensors, not allocator caching or kernels' private workspaces.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from models import get_model  # noqa: E402
from pruners import eigendamage, kfac_criteria  # noqa: E402
from pruners.registry import get_method  # noqa: E402

KFAC_METHODS = ("C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS", "Eigen")
METHODS = ("Weight", "Random", "Taylor", "OBA", "fastOBA") + KFAC_METHODS
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


# ---------------------------------------------------------------------------------------------
# Peak memory

class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive, op by op."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, tuple] = {}  # storage address -> (weak reference, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._release_expired()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _release_expired(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]


def measure_peak(fn: Callable, device: str) -> int:
    """Peak bytes allocated by one call of fn (see the module docstring)."""
    if device.startswith("cuda"):  # the model's GPU, which need not be the current device
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    tracker = LiveTensorPeak()
    with tracker:
        fn()
    return tracker.peak


# ---------------------------------------------------------------------------------------------
# The calls

class StatisticsRecorder:
    """Context manager: while active, the K-FAC criteria's calls of collect_kfac_statistics are
    recorded (options and result); with `replay` set they get the recorded result instead."""

    MODULES = (kfac_criteria, eigendamage)

    def __init__(self, original: Callable):
        self.original, self.calls, self.replay = original, [], False

    def __call__(self, model, batches, loss_fn, **options):
        if self.replay:
            return self.calls[-1][1]
        result = self.original(model, batches, loss_fn, **options)
        self.calls.append((options, result))
        return result

    @contextlib.contextmanager
    def active(self, replay: bool = False):
        self.replay = replay
        saved = [m.collect_kfac_statistics for m in self.MODULES]
        for m in self.MODULES:
            m.collect_kfac_statistics = self
        try:
            yield self
        finally:
            for m, f in zip(self.MODULES, saved):
                m.collect_kfac_statistics = f


def make_calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor, methods: List[str]):
    """{method: (first call, per-batch call, per-step call or None)}."""
    loss_fn = nn.CrossEntropyLoss()

    def train():
        loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    calls = {"train": (train, train, None)}
    for name in methods:
        method = get_method(name)

        def score(method=method):
            return method.score(model, [(x, y)], loss_fn)
        if name not in KFAC_METHODS:
            calls[name] = (score, score, None)
            continue
        recorder = StatisticsRecorder(kfac_criteria.collect_kfac_statistics)

        def first(recorder=recorder, score=score):
            with recorder.active():
                return score()

        def per_batch(recorder=recorder, method=method):
            options = recorder.calls[-1][0]
            with torch.enable_grad():
                return recorder.original(model, [(x, y)], loss_fn, **options)

        if name == "Eigen":
            def per_step(recorder=recorder):
                stats = eigendamage.EigenStatistics(recorder.calls[-1][1])
                modules = dict(model.named_modules())
                return [stats.eigenbasis(key, modules[key]) for key in stats.layers]
        else:
            def per_step(recorder=recorder, score=score):
                with recorder.active(replay=True):
                    return score()
        calls[name] = (first, per_batch, per_step)
    return calls


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(fn: Callable, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_model(model_name, batch_size, device, repeats, step_repeats, methods) -> List[dict]:
    model, x, y = build(model_name, batch_size, device)
    calls = make_calls(model, x, y, methods)
    names = list(calls)
    if device.startswith("cuda"):
        # cuBLAS / cuDNN allocate their workspaces on first use and keep them: one untimed
        # training step first, so they do not count in the training step's peak (the
        # denominator of every ratio) and nowhere else.
        calls["train"][1]()
        torch.cuda.synchronize(device)
    peak = {m: measure_peak(calls[m][0], device) for m in names}  # also the warm-up
    per_batch = {m: [] for m in names}
    for _ in range(repeats):
        for m in names:
            per_batch[m].append(_timed(calls[m][1], device))
    per_step = {m: statistics.median(_timed(calls[m][2], device) for _ in range(step_repeats))
                for m in names if calls[m][2] is not None}
    train_s, train_peak = statistics.median(per_batch["train"]), max(peak["train"], 1)
    rows = []
    for m in names:
        batch_s = statistics.median(per_batch[m])
        step_s = per_step.get(m)
        rows.append({"model": model_name, "batch": batch_size, "method": m,
                     "batch_s": batch_s, "batch_x_train": batch_s / train_s,
                     "step_s": step_s, "step_x_train": None if step_s is None else step_s / train_s,
                     "peak_bytes": peak[m], "peak_x_train": peak[m] / train_peak})
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| model | method | per batch s | × train | per step s | × train | peak MiB | × train |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        step = ("-", "-") if r["step_s"] is None else (f"{r['step_s']:.2f}", f"{r['step_x_train']:.1f}")
        lines.append(f"| {r['model']} | {r['method']} | {r['batch_s']:.2f} | "
                     f"{r['batch_x_train']:.1f} | {step[0]} | {step[1]} | "
                     f"{r['peak_bytes'] / 2 ** 20:.0f} | {r['peak_x_train']:.1f} |")
    return "\n".join(lines)


def compare(before_path: str, after_path: str) -> str:
    """Markdown table of two --json outputs side by side, with after/before ratios."""
    with open(before_path) as f:
        before = {(r["model"], r["method"]): r for r in json.load(f)}
    with open(after_path) as f:
        after = json.load(f)

    def cell(r, key):
        return "-" if r is None or r[key] is None else f"{r[key]:.1f}"

    def ratio(b, a, key):
        if b is None or a[key] is None or not b[key]:
            return "-"
        return f"{a[key] / b[key]:.2f}"
    lines = ["| model | method | per batch × train: before → after | per step × train: before → "
             "after | peak × train: before → after | s per batch after/before | s per step "
             "after/before | peak after/before |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
    for a in after:
        b = before.get((a["model"], a["method"]))
        lines.append(
            f"| {a['model']} | {a['method']} | {cell(b, 'batch_x_train')} → "
            f"{cell(a, 'batch_x_train')} | {cell(b, 'step_x_train')} → {cell(a, 'step_x_train')} | "
            f"{cell(b, 'peak_x_train')} → {cell(a, 'peak_x_train')} | "
            f"{ratio(b, a, 'batch_s')} | {ratio(b, a, 'step_s')} | {ratio(b, a, 'peak_bytes')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["vgg19", "resnet32"])
    parser.add_argument("--batch_size", type=int, default=None,
                        help="override every model's batch size (default 64; 224 px models: "
                             "32 on CUDA, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of per-batch calls")
    parser.add_argument("--step_repeats", type=int, default=1,
                        help="timed calls of each K-FAC criterion's per-step part")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="criteria to measure (the training step is always measured)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="print a before/after table of two --json files and stop")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return
    if args.repeats < 1 or args.step_repeats < 1:
        parser.error("--repeats and --step_repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}",
          flush=True)
    rows = []
    for name in args.models:
        batch = args.batch_size or default_batch(name, args.device)
        rows += run_model(name, batch, args.device, args.repeats, args.step_repeats, args.methods)
    print(markdown(rows))
    print("per batch: median seconds of the per-batch part (K-FAC family: the statistics); "
          "per step: the K-FAC family's factorisation and scoring, once per pruning step; "
          "peak: " + ("CUDA max_memory_allocated of one call" if args.device.startswith("cuda")
                      else "peak live tensor bytes of one call (TorchDispatchMode)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

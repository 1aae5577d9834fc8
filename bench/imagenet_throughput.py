"""Fine-tuning throughput and inference latency, dense vs pruned (synthetic ImageNet-sized input).

    python bench/imagenet_throughput.py --device cuda                      # resnet50, vit_b_16, 224 px
    python bench/imagenet_throughput.py --device cuda --amp                # with mixed precision
    python bench/imagenet_throughput.py --device cuda --pruned vit_b_16=out/pruned_model.pth
    python bench/imagenet_throughput.py --device cpu --image_size 32 --batch_size 4 \
        --latency_batch 4 --steps 2 --warmup 1 --models resnet50          # quick check on a CPU

For every model: the dense torchvision network, and a pruned one — read from a file written by
the pruning scripts (--pruned name=path), or made here by the project's FLOPs-target driver with
Weight (magnitude) importance, which needs no data, at --ops_ratio of the dense MACs. Then:
  train images/s   one SGD step (forward, backward, optimiser step; --amp: autocast + GradScaler)
                   at --batch_size, median over --steps timed steps after --warmup ones;
  latency          eval-mode forward at --latency_batch (default 64), median ms per batch.
CUDA timings use CUDA events after warm-up; CPU timings use perf_counter.
Prints a Markdown table (MACs for one image: multiply-accumulates).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import get_classifier, get_model  # noqa: E402
from utils.checkpoint import load_pruned_model  # noqa: E402
from utils.cli import resolve_device  # noqa: E402
from utils.flops import count_macs, count_params  # noqa: E402


def build_dense(name: str, classes: int, image_size: int) -> nn.Module:
    kwargs = {"image_size": image_size} if name.startswith("vit") else {}
    return get_model(name, classes, **kwargs)


def prune_copy(dense: nn.Module, ratio: float, image_size: int) -> nn.Module:
    """A pruned copy at `ratio` of the dense MACs by magnitude (Weight) importance: no data."""
    from pruners.driver import PruneSettings, prune_to_target

    model = copy.deepcopy(dense).cpu()
    example = torch.zeros(2, 3, image_size, image_size)
    settings = PruneSettings(target_ops_ratio=ratio, iterative_steps=4, iters_per_step=1)
    prune_to_target(model, "Weight", lambda n: [], nn.CrossEntropyLoss(), example, settings,
                    [get_classifier(model)], progress=False)
    return model


class Timer:
    """Seconds of a callable: CUDA events on a GPU (asynchronous kernels), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        if self.cuda is not None:
            # The events go on the stream of the model's GPU, not the current device's
            # (cuda:N with N > 0 would otherwise time an idle cuda:0).
            stream = torch.cuda.current_stream(self.cuda)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            torch.cuda.synchronize(self.cuda)
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def train_images_per_s(model, batch, classes, image_size, device, steps, warmup, amp) -> float:
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step():
        with torch.autocast(device.type, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    timer = Timer(device)
    for _ in range(warmup):
        step()
    times = [timer(step) for _ in range(steps)]
    return batch / statistics.median(times)


@torch.inference_mode()
def latency_ms(model, batch, image_size, device, steps, warmup, amp) -> float:
    model = model.to(device).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def forward():
        with torch.autocast(device.type, enabled=amp):
            model(x)

    timer = Timer(device)
    for _ in range(warmup):
        forward()
    return 1000.0 * statistics.median(timer(forward) for _ in range(steps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    p.add_argument("--pruned", nargs="*", default=[], metavar="NAME=PATH",
                   help="pruned model files (pruned-model format) to use instead of a quick copy")
    p.add_argument("--ops_ratio", type=float, default=0.5,
                   help="MACs kept by the quick pruned copy (Weight importance)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=64, help="training step batch")
    p.add_argument("--latency_batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", action="store_true", help="CUDA autocast (float16) for both timings")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.amp and device.type != "cuda":
        p.error("--amp needs --device cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    files = dict(item.split("=", 1) for item in args.pruned)
    example = torch.zeros(1, 3, args.image_size, args.image_size)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = build_dense(name, args.classes, args.image_size)
        pruned = (load_pruned_model(files[name]) if name in files
                  else prune_copy(dense, args.ops_ratio, args.image_size))
        base = None
        for variant, model in (("dense", dense), ("pruned", pruned)):
            macs = count_macs(model.cpu(), example)
            ips = train_images_per_s(model, args.batch_size, args.classes, args.image_size, device,
                                     args.steps, args.warmup, args.amp)
            lat = latency_ms(model, args.latency_batch, args.image_size, device, args.steps,
                             args.warmup, args.amp)
            model.cpu()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            base = base or (macs, ips, lat)
            rows.append((name, variant, macs / 1e9, count_params(model) / 1e6, ips, lat,
                         macs / base[0], ips / base[1], base[2] / lat))
    print(f"\ndevice {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
          f", {args.image_size} px, train batch {args.batch_size}, latency batch "
          f"{args.latency_batch}, amp {args.amp}, median of {args.steps} steps\n")
    print("| model | variant | GMACs | params (M) | train img/s | latency (ms) | MACs ratio "
          "| train speed-up | latency speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.3f} "
              f"| {r[7]:.2f}x | {r[8]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

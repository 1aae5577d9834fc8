#!/usr/bin/env python
"""Latency of 2:4 semi-structured sparse linear layers against dense (vit_b_16, batch 64).

    python bench/sparse_latency.py --device cuda --batch_size 64

Every nn.MultiheadAttention is first split into q/k/v/out nn.Linear layers (SplitAttention, same
function) so the attention projections are ordinary linear layers too. Each encoder linear layer
gets a 2:4 pattern by magnitude (pruners.unstructured.nm_masks), then
torch.sparse.to_sparse_semi_structured. Timed with CUDA events, median over --iters runs after
--warmup: every distinct linear layer on its real input (batch x tokens rows), the sum over the
encoder, and the whole network forward. Needs a GPU with sparse tensor cores (compute capability
8.0+, e.g. A100, H100) and fp16 / bf16.
"""
import copy
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import get_classifier, get_model  # noqa: E402
from models.attention import convert_attention  # noqa: E402
from pruners import unstructured as us  # noqa: E402
from utils import cli  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse(argv=None):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b_16")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    return p.parse_args(argv)


def check_device(name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise cli.UsageError("this benchmark needs a CUDA GPU with sparse tensor cores (compute "
                             "capability 8.0+, e.g. A100/H100); none is available here")
    device = cli.resolve_device(name)
    if device.type != "cuda":
        raise cli.UsageError(f"--device {name}: 2:4 semi-structured kernels run only on CUDA; "
                             "pass --device cuda")
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        raise cli.UsageError(f"{torch.cuda.get_device_name(device)} has no sparse tensor cores "
                             "(compute capability 8.0+ needed)")
    return device


def median_ms(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median CUDA-event time of fn on `device` (events on its stream, not cuda:0's)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def linear_inputs(model: nn.Module, x: torch.Tensor, names) -> dict:
    """{layer name: the 2-D input the layer sees in one forward}."""
    seen, hooks = {}, []
    modules = dict(model.named_modules())
    def recorder(name):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            seen.setdefault(name, inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
        return hook

    for n in names:
        hooks.append(modules[n].register_forward_hook(recorder(n)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1] if "attention" in name else "mlp." + name.rsplit(".", 1)[-1]


@torch.no_grad()
def main(argv=None):
    args = parse(argv)
    device = check_device(args.device)
    dtype = DTYPES[args.dtype]
    model = convert_attention(get_model(args.model, 1000)).to(device, dtype).eval()
    head = get_classifier(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    targets = {n: us.Target(model.get_submodule(n)) for n in names}
    scores = {n: t.tensor.detach().abs().float() for n, t in targets.items()}
    us.zero_pruned(targets, us.nm_masks(scores, us.all_kept(targets), 2, 4))
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    inputs = linear_inputs(model, x, names)

    sparse_model = copy.deepcopy(model)
    converted = set(us.to_semi_structured(sparse_model))
    sparse_modules = dict(sparse_model.named_modules())

    # One row per distinct layer shape (all 12 blocks share them); the encoder total sums every layer.
    rows, seen_kinds, total_dense, total_sparse = [], set(), 0.0, 0.0
    for n in names:
        inp = inputs[n]
        dense_w = targets[n].tensor
        dense = median_ms(lambda: F.linear(inp, dense_w), args.warmup, args.iters, device)
        if n in converted:
            sw = sparse_modules[n].weight
            sparse = median_ms(lambda: F.linear(inp, sw), args.warmup, args.iters, device)
        else:
            sparse = dense
        total_dense += dense
        total_sparse += sparse
        k = kind(n)
        if k not in seen_kinds:
            seen_kinds.add(k)
            rows.append((k, tuple(inp.shape), tuple(dense_w.shape), dense, sparse, n in converted))
    whole_dense = median_ms(lambda: model(x), args.warmup, args.iters, device)
    try:
        whole_sparse = median_ms(lambda: sparse_model(x), args.warmup, args.iters, device)
    except RuntimeError as err:  # a kernel constraint of this torch build; the layer table stands
        whole_sparse, whole_error = float("nan"), str(err).splitlines()[0][:200]
    else:
        whole_error = None

    print(f"{args.model}, batch {args.batch_size}, {args.dtype}, {torch.cuda.get_device_name(device)}, "
          f"torch {torch.__version__}; median of {args.iters} runs (CUDA events), ms")
    print(f"{len(converted)}/{len(names)} linear layers converted to 2:4 semi-structured "
          "(classifier kept dense)\n")
    print("| layer | input | weight | dense ms | 2:4 ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for k, inp, w, d, s, ok in rows:
        note = "" if ok else " (not converted)"
        print(f"| {k} | {inp[0]}x{inp[1]} | {w[0]}x{w[1]} | {d:.3f} | {s:.3f} | {d / s:.2f}x{note} |")
    print(f"| all encoder linear layers ({len(names)}) | | | {total_dense:.2f} | {total_sparse:.2f} | "
          f"{total_dense / total_sparse:.2f}x |")
    print(f"| whole network forward | | | {whole_dense:.2f} | {whole_sparse:.2f} | "
          f"{whole_dense / whole_sparse:.2f}x |")
    if whole_error:
        print(f"whole-network 2:4 forward failed: {whole_error}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)

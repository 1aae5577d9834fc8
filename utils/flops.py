"""Counting multiply-accumulates (MACs) and parameters.

MACs are counted with torch.utils.flop_counter.FlopCounterMode, which sees every aten matrix
product and convolution whatever called it (modules, F.linear, torch.matmul / einsum / bmm, and
the attention products inside F.multi_head_attention_forward and
F.scaled_dot_product_attention). Two gaps of the stock counter are closed here:

* nn.MultiheadAttention / nn.TransformerEncoderLayer take a fused "fast path" in eval mode
  without gradients whose kernels the counter cannot see; it is switched off while counting.
* some fused attention kernels (e.g. the CPU flash kernel) have no registered formula; they
  get the standard one: Q·Kᵀ plus A·V.

One MAC is two of the counter's FLOPs. Elementwise work (activations, normalisation, softmax,
pooling, residual additions) is not counted, as in torchvision's published figures.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]

BASIS_SUFFIX = "_basis"
ATTENTION_KERNELS = ("_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_fused_attention_overrideable",
                     "_scaled_dot_product_attention_math_for_mps")


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(Q Kᵀ) V for (..., L, E) queries, (..., S, E) keys, (..., S, Ev) values."""
    *batch, length, dim = query_shape
    source, value_dim = key_shape[-2], value_shape[-1]
    # Grouped-query attention broadcasts key/value heads to the query heads: count per query head.
    heads = math.prod(batch)
    return 2 * heads * length * source * (dim + value_dim)


def _missing_attention_formulas() -> dict:
    formulas = {}
    for name in ATTENTION_KERNELS:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            formulas[op] = _attention_flops
    return formulas


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        # Older torch: the fast path is skipped whenever gradients are being recorded.
        with torch.enable_grad():
            yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule, each flag restored afterwards (they may differ)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _as_tuple(example_inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _model_placement(model: nn.Module):
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """MACs of one forward pass for ONE input (the count for the batch divided by its size).

    The model runs once in eval mode without gradients; its train/eval flags, weights and
    buffers are as before afterwards. Floating inputs are moved to the model's device and dtype.
    """
    inputs = _as_tuple(example_inputs)
    if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
        raise ValueError("example_inputs must be a batched tensor or a sequence of them")
    batch_size = inputs[0].shape[0]
    device, dtype = _model_placement(model)
    inputs = tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
                   for x in inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_missing_attention_formulas())
    with _eval_mode(model), _mha_fastpath_disabled(), counter:
        model(*inputs)
    return counter.get_total_flops() // 2 // max(batch_size, 1)


def count_params(model: nn.Module) -> int:
    """Every parameter (trainable or frozen) plus buffers named '*_basis' (fixed EigenDamage
    rotation bases), each tensor counted once."""
    seen = set()
    total = 0
    tensors = [p for p in model.parameters()]
    tensors += [b for name, b in model.named_buffers() if name.endswith(BASIS_SUFFIX)]
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def count_macs_params(model: nn.Module, example_inputs: Inputs) -> Tuple[int, int]:
    return count_macs(model, example_inputs), count_params(model)


def format_count(n: float) -> str:
    """4090000000 -> '4.09 G', 20035018 -> '20.04 M', 950 -> '950'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{int(n)}" if float(n).is_integer() else f"{n:.2f}"

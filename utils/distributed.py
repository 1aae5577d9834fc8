"""Multi-process runs through PyTorch's own stack: torchrun sets the environment, torch.distributed
does the communication (NCCL on GPUs, gloo on CPU), DistributedDataParallel trains.

A script calls `init_distributed(device_flag)` once; without torchrun (no WORLD_SIZE > 1 in the
environment) everything here is a no-op for a single process, so the same code serves both.

    torchrun --nproc_per_node 8 train_imagenet.py ...        one node, 8 GPUs
    torchrun --nproc_per_node 2 prune_imagenet.py --device cpu   two CPU processes (gloo)
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


class DistributedError(ValueError):
    """A distributed set-up the user can fix; one line."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; "
                               "start the script with torchrun or unset it") from None


def init_distributed(device_flag: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device.

    device_flag: 'auto' (this process's GPU when CUDA is available, else CPU), 'cpu', 'cuda',
    'cuda:N' (single process only). Under torchrun each process uses GPU LOCAL_RANK."""
    from utils.cli import resolve_device  # the one place that validates --device

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_flag)
    if world > 1 and device.type == "cuda":
        if device_flag not in ("auto", "cuda"):  # the same answer on every process
            raise DistributedError(f"--device {device_flag} names one GPU, but under torchrun each "
                                   "process uses GPU LOCAL_RANK; pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                                   "GPU(s) are visible; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def env_world_size() -> int:
    """The number of processes torchrun starts (1 without torchrun), readable before joining."""
    return _env_int("WORLD_SIZE", 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a new tensor on the tensor's own device)."""
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_reduce_dict(tensors: dict) -> dict:
    """Sum each tensor of `tensors` over all processes, in one flat message per dtype.

    Every process must pass the same keys with the same shapes (same network, same code path)."""
    if not is_distributed():
        return {k: v.clone() for k, v in tensors.items()}
    if not tensors:
        return {}
    keys = sorted(tensors)
    out = {}
    by_dtype = {}
    for k in keys:
        by_dtype.setdefault(tensors[k].dtype, []).append(k)
    for dtype, names in by_dtype.items():
        flat = torch.cat([tensors[k].detach().reshape(-1).to(_comm_device()) for k in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for k in names:
            n = tensors[k].numel()
            out[k] = flat[offset:offset + n].view_as(tensors[k]).to(tensors[k].device)
            offset += n
    return out


def all_gather_object(obj: Any) -> List[Any]:
    if not is_distributed():
        return [obj]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agreed(check: Callable[[], None]) -> None:
    """Run `check` (e.g. of a shared folder) on rank 0 and raise what it raised on every process:
    an error on one process only would leave the others waiting in their next collective."""
    if not is_distributed():
        check()
        return
    failure = None
    if is_main():
        try:
            check()
        except ValueError as err:  # our one-line user errors
            failure = err
    failure = broadcast_object(failure)
    if failure is not None:
        raise failure


def decided(decide: Callable[[], Any]) -> Any:
    """`decide()` evaluated on rank 0 (e.g. whether a result already exists on disk) and handed
    to every process, so all take the same branch."""
    return broadcast_object(decide() if is_main() else None)


def model_fingerprint(model: nn.Module) -> dict:
    """Shapes (exact) and a float checksum of every parameter and buffer, to compare ranks."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    digest = hashlib.sha1(repr(sorted(shapes.items())).encode()).hexdigest()
    total = 0.0
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                total += float(v.double().abs().sum())
    return {"shapes": digest, "checksum": total}


def check_same_model(model: nn.Module, what: str, rtol: float = 1e-5) -> None:
    """Raise unless every process holds a network of the same shapes and (to `rtol`) the same
    weights; then make them bit-identical by broadcasting rank 0's tensors.

    Ranks run the same deterministic code on the same all-reduced scores, so they should agree;
    a mismatch means divergence (different data, library versions or non-determinism) and
    continuing would silently train different networks."""
    if not is_distributed():
        return
    prints = all_gather_object(model_fingerprint(model))
    if any(p["shapes"] != prints[0]["shapes"] for p in prints):
        raise DistributedError(f"processes disagree on the network's shapes after {what}; make sure "
                               "every process runs the same code, data and --seed")
    ref = prints[0]["checksum"]
    if any(abs(p["checksum"] - ref) > rtol * max(abs(ref), 1.0) for p in prints):
        raise DistributedError(f"processes disagree on the network's weights after {what} "
                               f"(checksums {[round(p['checksum'], 6) for p in prints]}); make "
                               "sure every process runs the same code, data and --seed")
    broadcast_from_main(model.state_dict().values())


def broadcast_from_main(tensors) -> None:
    """Overwrite each tensor, in place, with rank 0's value."""
    if not is_distributed():
        return
    with torch.no_grad():
        for v in tensors:
            buf = v.detach().to(_comm_device())
            dist.broadcast(buf, src=0)
            if buf.data_ptr() != v.data_ptr():
                v.copy_(buf.to(v.device))


def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> List[int]:
    """The items of 0..n-1 this process handles: rank, rank + world, ... (no padding)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(range(r, n, w))


def average_batchnorm_statistics(model: nn.Module, batches_used: int) -> None:
    """After each process re-estimated BatchNorm running statistics on its own `batches_used`
    batches, replace them by the batch-weighted mean over all processes: the same statistics a
    single process would compute from all the batches (it averages per-batch moments too)."""
    if not is_distributed():
        return
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    weight = float(batches_used)
    stats = {}
    for i, m in enumerate(norms):
        stats[f"{i}.mean"] = m.running_mean.double() * weight
        stats[f"{i}.var"] = m.running_var.double() * weight
    stats = all_reduce_dict(stats)
    total = float(all_reduce_sum(torch.tensor(weight, dtype=torch.float64)))
    if total <= 0:
        return
    with torch.no_grad():
        for i, m in enumerate(norms):
            m.running_mean.copy_(stats[f"{i}.mean"] / total)
            m.running_var.copy_(stats[f"{i}.var"] / total)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(int(total))

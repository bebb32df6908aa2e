"""Multi-process data parallelism under ``torchrun`` (gloo on CPU, nccl on GPU).

The loop averages gradients of every optimiser's parameters across ranks after
each backward pass (what DistributedDataParallel does, but it also works for
methods whose phases alternate between networks), and broadcasts rank 0's
weights at start so replicas stay identical.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FewstepError


def process_device(device: torch.device) -> torch.device:
    """The device of this process: under torchrun a bare ``cuda`` means ``cuda:$LOCAL_RANK`` (one GPU
    per process, as NCCL requires), made the current device; anything else is kept."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise FewstepError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FewstepError(f"device {str(device)!r} asked for, but this torch has no usable GPU (a CPU build, or "
                           "no GPU visible); use cpu (--device cpu)")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun only: the caller's GPU is theirs
        if device.index is None:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device) -> str:
    """gloo on CPU; on GPU, NCCL for CUDA tensors and gloo for the small CPU tensors of the loop's
    decisions (:func:`rank0_decides`, :func:`any_rank`, :func:`all_reduce_mean`)."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun; return (rank, world_size).
    Call with the device from :func:`process_device`."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
        # torn down before the interpreter exits: a process leaving with gloo's threads alive can
        # abort with "terminate called without an active exception"
        atexit.register(_destroy)
    return dist.get_rank(), dist.get_world_size()


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def average_gradients(params) -> None:
    """All-reduce-average the gradients of ``params`` (one flattened buffer)."""
    if not is_distributed():
        return
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def rank0_choice(choice: int) -> int:
    """Rank 0's small integer ``choice`` on every rank (one broadcast for a decision with several outcomes)."""
    if not is_distributed():
        return choice
    t = torch.tensor([int(choice)], dtype=torch.int32)
    dist.broadcast(t, src=0)
    return int(t.item())


def rank0_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a decision that must agree, e.g. a wall-clock stop:
    each rank's clock differs, and a rank that stops alone leaves the others waiting forever)."""
    return bool(rank0_choice(1 if flag else 0))


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a non-finite loss: every rank must
    skip the step, or the one that skips leaves the others waiting in the gradient all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_rank0(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0 (None elsewhere); ``[obj]`` without torchrun."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()

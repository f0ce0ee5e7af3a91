"""Distributed reduction of the key statistics under ``torch.distributed``.

Each rank sums the sequences ``rank::world_size`` of the same token stream; the float64 sums and
token counts are all-reduced (SUM), so every rank ends with the one-pass statistic.
"""

from __future__ import annotations

import torch
from torch import nn

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline.moments import MomentSum
from rlsedit_llm.pipeline.tokens import input_device

__all__ = ["setup", "all_reduce_sums", "all_have", "broadcast_int"]


def setup(distributed: bool | None, model: nn.Module) -> tuple[int, int, torch.device | None]:
    """``(rank, world, device_for_collectives)``; world 1 means single process."""
    import torch.distributed as dist

    if distributed is False or not dist.is_available():
        if distributed:
            raise HyperparameterError("distributed=True but torch.distributed is not available")
        return 0, 1, None
    if not dist.is_initialized():
        if not distributed:
            return 0, 1, None
        use_cuda = input_device(model).type == "cuda" and dist.is_nccl_available()
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        except (ValueError, RuntimeError, KeyError) as exc:
            raise HyperparameterError(
                "distributed=True needs torch.distributed initialised, or a launcher environment "
                f"(torchrun / accelerate launch: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): {exc}"
            ) from exc
    backend = dist.get_backend()
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.to(device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_sums(sums: dict[int, MomentSum], device: torch.device) -> dict[int, MomentSum]:
    """The sums over all ranks (SUM of totals and counts), on every rank."""
    out = {}
    for layer, s in sums.items():
        total = _all_reduce_sum(s.total, device)
        count = _all_reduce_sum(torch.tensor([s.count], dtype=torch.int64), device)
        out[layer] = MomentSum(total, int(count.item()))
    return out


def all_have(flags: list[bool], device: torch.device | str | None) -> list[bool]:
    """Per item, whether every rank has it (an all-reduce MIN of the flags)."""
    import torch.distributed as dist

    buf = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64).to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.MIN)
    return [bool(v) for v in buf.cpu().tolist()]


def broadcast_int(value: int, device: torch.device | str | None) -> int:
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    buf = torch.tensor([value], dtype=torch.int64).to(device)
    dist.broadcast(buf, src=0)
    return int(buf.item())

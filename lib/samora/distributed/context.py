"""This process's place in a torchrun job, and the few collective steps the trainers need.

Outside torchrun every helper is the identity of a one-process job, so the single-process path runs unchanged.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Rank and size of the running job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs progress and reports."""
        return self.rank == 0


def under_torchrun() -> bool:
    """Whether torchrun started this process (it sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def context() -> DistContext:
    """The initialised process group's ranks, or a one-process job."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def rank_device(requested: str | None) -> str:
    """The device of this rank: its own GPU (cuda:LOCAL_RANK) when CUDA is asked for, else the requested one."""
    if requested and requested.startswith("cuda") and under_torchrun():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def process_group(device: str | None = None) -> Iterator[DistContext]:
    """Join torchrun's process group for the body (NCCL on GPUs, gloo on CPUs); a no-op outside torchrun."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1 or dist.is_initialized():
        yield context()
        return
    on_gpu = rank_device(device).startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    ctx = context()
    if not ctx.is_main:
        logging.getLogger("samora").setLevel(logging.WARNING)  # progress and logs come from rank 0
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. builds a cache on disk), the others after it, then finding it built."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier()


def shard_rows(batch: Sequence, ctx: DistContext) -> list:
    """This rank's part of one global batch, interleaved as DistributedSampler does (rank, rank + world, ...)."""
    return list(batch[ctx.rank :: ctx.world_size])


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when it is true on one (so all ranks stop at the same step)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """The mean of a per-rank number (for logging a global loss)."""
    if not ctx.enabled:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item()) / ctx.world_size


def gather_rows(tensor: torch.Tensor, ctx: DistContext, counts: Sequence[int] | None = None) -> torch.Tensor:
    """The rows of every rank, concatenated by rank, with gradients flowing back to each rank's own rows.

    Losses that pool over the batch (Dice per class, NT-Xent negatives, batch norm) are computed on this global
    batch. Each rank then holds the whole loss and the gather's backward sums the ranks' gradients, i.e. world x
    this rank's share; DDP's average over ranks brings that back to exactly the one-process gradient.
    Every rank passes the same number of rows; `counts` (rows that are real on each rank, the rest padding) drops
    the padding."""
    if not ctx.enabled:
        return tensor if counts is None else tensor[: counts[0]]
    with warnings.catch_warnings():
        # deprecated in favour of a private module, but still torch's public differentiable all-gather
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(tensor.contiguous())
    if counts is not None:
        parts = [part[:n] for part, n in zip(parts, counts, strict=True)]
    return torch.cat(parts)


def wrap_ddp(module: nn.Module, ctx: DistContext, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around `module` when several ranks run (gradients averaged over ranks)."""
    if not ctx.enabled:
        return module
    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

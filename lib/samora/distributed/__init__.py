"""Training on several processes (GPUs, or CPU processes with gloo) through torchrun and DistributedDataParallel.

`context` knows this process's rank; `plan` decides how many processes a request gets; `launch` starts them with
`torch.distributed.run`; `jobs` is what the app's trainers run inside those processes.
"""

from samora.distributed.context import (
    DistContext,
    any_rank,
    context,
    gather_rows,
    main_first,
    mean_over_ranks,
    process_group,
    rank_device,
    shard_rows,
    under_torchrun,
    wrap_ddp,
)
from samora.distributed.plan import ProcessPlan, plan_processes

__all__ = [
    "DistContext",
    "ProcessPlan",
    "any_rank",
    "context",
    "gather_rows",
    "main_first",
    "mean_over_ranks",
    "plan_processes",
    "process_group",
    "rank_device",
    "shard_rows",
    "under_torchrun",
    "wrap_ddp",
]

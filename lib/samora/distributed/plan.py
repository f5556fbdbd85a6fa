"""How many training processes a request gets: the one rule shared by the command line and the app's trainers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessPlan:
    """Processes to start on this node, on which device, with which GPUs visible, and why."""

    nproc: int
    device: str
    gpus: tuple[int, ...] | None = None  # CUDA_VISIBLE_DEVICES of the job (None: leave as is)
    reason: str = ""

    @property
    def launches(self) -> bool:
        """Whether the job needs torchrun (more than one process)."""
        return self.nproc > 1


def plan_processes(
    device: str = "cpu",
    nproc: int | None = None,
    gpus: object = None,
    multi_gpu: bool = False,
    cpu_processes: int = 0,
) -> ProcessPlan:
    """Processes for `--nproc N` (command line) or for MONAI Label's `gpus` / `multi_gpu` (app trainers).

    GPUs are used only when `device` is CUDA. Without a usable GPU a multi-GPU request runs `cpu_processes` gloo
    processes when that is above 1 (a test and benchmark setting), else one process, with the reason saying so."""
    if nproc is not None:
        return _plan_nproc(device, nproc)
    if not multi_gpu:
        return ProcessPlan(1, device, reason="one process (multi_gpu not requested)")
    available = torch.cuda.device_count() if device.startswith("cuda") else 0
    chosen = _parse_gpus(gpus, torch.cuda.device_count())
    if available == 0:
        if cpu_processes > 1:
            return ProcessPlan(cpu_processes, "cpu", reason=f"no GPU in use: {cpu_processes} gloo CPU processes")
        why = "device is not CUDA" if not device.startswith("cuda") else "no CUDA GPU is visible"
        return ProcessPlan(1, device, reason=f"multi-GPU training requested but {why}: training in one process")
    chosen = chosen if chosen is not None else tuple(range(available))
    if len(chosen) == 1:
        return ProcessPlan(1, device, chosen, reason=f"one GPU selected ({chosen[0]}): training in one process")
    return ProcessPlan(len(chosen), "cuda", chosen, reason=f"{len(chosen)} processes on GPUs {list(chosen)}")


def _plan_nproc(device: str, nproc: int) -> ProcessPlan:
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        if nproc > count:
            raise ValueError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; this node has {count}")
    return ProcessPlan(nproc, device, reason=f"{nproc} process(es) on {device}")


def _parse_gpus(gpus: object, count: int) -> tuple[int, ...] | None:
    """GPU indices of a request's `gpus` ("all", [0, 1], "0,1"); None for all. Unknown GPUs are an error."""
    if gpus is None or (isinstance(gpus, str) and gpus.strip().lower() in ("", "all")):
        return None
    items = gpus.split(",") if isinstance(gpus, str) else gpus if isinstance(gpus, (list, tuple)) else [gpus]
    try:
        chosen = tuple(int(str(item).strip()) for item in items)
    except ValueError:
        raise ValueError(f"param 'gpus' must be 'all' or GPU indices such as [0, 1], got {gpus!r}") from None
    missing = [i for i in chosen if not 0 <= i < count]
    if missing or len(set(chosen)) != len(chosen) or not chosen:
        raise ValueError(f"param 'gpus': {list(chosen)} names GPUs that do not exist or repeat (this node has {count})")
    return chosen

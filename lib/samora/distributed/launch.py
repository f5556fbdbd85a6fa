"""Start a job's processes on this node with torchrun (`python -m torch.distributed.run --standalone`).

Several nodes are started by running torchrun on each with rendezvous arguments instead (README, "Scaling")."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from samora.distributed.context import rank_device, under_torchrun
from samora.distributed.plan import ProcessPlan, plan_processes

log = logging.getLogger(__name__)


def torchrun_command(nproc: int, target: Sequence[str]) -> list[str]:
    """The command starting `nproc` ranks of `target` (e.g. ["-m", "samora.cli", "pretrain", ...]) on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]


def job_environment(plan: ProcessPlan) -> dict[str, str]:
    """The parent's environment, plus: samora importable, the chosen GPUs visible, CPU threads split over ranks."""
    env = dict(os.environ)
    lib = str(Path(__file__).resolve().parents[2])  # the folder holding the samora package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib, env.get("PYTHONPATH")) if p)
    if plan.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in plan.gpus)
    if plan.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.nproc))
    return env


def run_torchrun(
    plan: ProcessPlan, target: Sequence[str], on_poll: Callable[[], None] | None = None, poll_s: float = 2.0
) -> None:
    """Run the job to its end, calling `on_poll` while it runs (to relay progress); raise if any rank failed."""
    command = torchrun_command(plan.nproc, target)
    log.info("launching %s: %s", plan.reason, " ".join(command))
    process = subprocess.Popen(command, env=job_environment(plan))
    try:
        while process.poll() is None:
            if on_poll is not None:
                on_poll()
            time.sleep(poll_s)
    except BaseException:
        process.terminate()  # torchrun forwards the signal to its ranks
        process.wait()
        raise
    if on_poll is not None:
        on_poll()
    if process.returncode != 0:
        raise RuntimeError(f"the {plan.nproc}-process training job failed (exit status {process.returncode})")


def relaunch_cli(nproc: int, device: str | None, argv: Sequence[str]) -> bool:
    """Run this `samora` command as `nproc` torchrun ranks when asked and not already one; True if it did.

    Inside torchrun (started here or by the user with rendezvous arguments for several nodes) the command runs
    as one rank and `--nproc` is ignored: torchrun's own arguments decide the job's size."""
    plan = plan_processes(device or rank_device(None), nproc=nproc)
    if not plan.launches or under_torchrun():
        return False
    run_torchrun(plan, ["-m", "samora.cli", *_without_nproc(argv)], poll_s=0.5)
    return True


def _without_nproc(argv: Sequence[str]) -> list[str]:
    # torchrun's parser would take "--nproc" for its own --nproc-per-node (argparse prefix matching)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept

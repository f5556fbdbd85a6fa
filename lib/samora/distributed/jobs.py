"""Training jobs prepared by one process (an app trainer) and run by torchrun ranks:
`python -m samora.distributed.jobs JOB_DIR`.

The preparing process writes `job.json` and the inputs (model, memory-mappable slices); rank 0 writes
`progress.json` while training, then the outputs and `result.json`, all atomically. The preparing process relays
the progress to its callbacks and, for stage 2, loads the trained model to publish it as a one-process run does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from samora.distributed.context import process_group, rank_device
from samora.distributed.launch import run_torchrun
from samora.distributed.plan import ProcessPlan
from samora.io_utils import atomic_write_json

log = logging.getLogger(__name__)

JOB_FILE, PROGRESS_FILE, RESULT_FILE = "job.json", "progress.json", "result.json"


def run_finetune_job(jobs_root: Path, plan: ProcessPlan, model, train, val, config, callbacks: dict[str, Callable]):
    """Stage 2 on `plan.nproc` ranks; returns (trained model, finetune's result). `callbacks`: on_epoch, on_encode.
    The job's folder (under `jobs_root`, which every rank must see) is removed afterwards."""
    with _job_folder(jobs_root) as job_dir:
        return _finetune_job(job_dir, plan, model, train, val, config, callbacks)


def run_pretrain_job(jobs_root: Path, plan: ProcessPlan, arguments: dict[str, Any], on_step: Callable | None):
    """`samora.ssl.pretrain(**arguments)` on `plan.nproc` ranks; returns its summaries."""
    with _job_folder(jobs_root) as job_dir:
        _write_job(job_dir, {"kind": "pretrain", "arguments": arguments})
        return _run(job_dir, plan, {"on_step": on_step} if on_step else {})


@contextmanager
def _job_folder(jobs_root: Path) -> Iterator[Path]:
    Path(jobs_root).mkdir(parents=True, exist_ok=True)
    job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=jobs_root))
    try:
        yield job_dir
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)  # its inputs are copies; the outputs have been read


def _finetune_job(job_dir: Path, plan: ProcessPlan, model, train, val, config, callbacks: dict[str, Callable]):
    from samora.model import SamoraModel

    model.save(job_dir / "model")
    train.save(job_dir / "train")
    if val is not None and len(val):
        val.save(job_dir / "val")
    checkpoint = model.config.checkpoint
    _write_job(job_dir, {"kind": "finetune", "config": asdict(config), "checkpoint": checkpoint})
    result = _run(job_dir, plan, callbacks)
    return SamoraModel.load(job_dir / "trained", checkpoint=checkpoint, map_location=config.device), result


def _write_job(job_dir: Path, job: dict) -> None:
    atomic_write_json(job_dir / JOB_FILE, job)


def _run(job_dir: Path, plan: ProcessPlan, callbacks: dict[str, Callable]) -> Any:
    last: list[Any] = [None]

    def relay() -> None:
        try:
            event = json.loads((job_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return
        if event != last[0] and event["name"] in callbacks:
            last[0] = event
            callbacks[event["name"]](*event["args"])

    run_torchrun(plan, ["-m", "samora.distributed.jobs", str(job_dir)], on_poll=relay, poll_s=1.0)
    return json.loads((job_dir / RESULT_FILE).read_text())


# ----- inside each rank -------------------------------------------------------------------------------------------


def _reporter(job_dir: Path, name: str) -> Callable[..., None]:
    """A callback that records its latest call for the preparing process (called on rank 0 only)."""
    return lambda *args: atomic_write_json(job_dir / PROGRESS_FILE, {"name": name, "args": list(args)})


def _finetune_rank(job_dir: Path, job: dict) -> None:
    from samora.engine.train import FinetuneConfig, LabeledSlices, finetune
    from samora.model import SamoraModel

    settings = dict(job["config"])
    settings["device"] = rank_device(settings["device"])
    with process_group(settings["device"]) as ctx:
        model = SamoraModel.load(job_dir / "model", checkpoint=job["checkpoint"], map_location="cpu")
        val = LabeledSlices.open(job_dir / "val") if (job_dir / "val").is_dir() else None
        result = finetune(
            model,
            LabeledSlices.open(job_dir / "train"),
            FinetuneConfig(**settings),
            val=val,
            on_epoch=_reporter(job_dir, "on_epoch"),
            on_encode=_reporter(job_dir, "on_encode"),
        )
        if ctx.is_main:
            staging = job_dir / "trained.partial"
            model.save(staging)
            os.replace(staging, job_dir / "trained")
            atomic_write_json(job_dir / RESULT_FILE, result)


def _pretrain_rank(job_dir: Path, job: dict) -> None:
    from samora.ssl.pretraining import pretrain
    from samora.ssl.trainer import RunHooks

    arguments = dict(job["arguments"])
    with process_group(arguments.get("device")) as ctx:
        hooks = RunHooks(progress=False, log=log.info, on_step=_reporter(job_dir, "on_step"))
        summaries = pretrain(**arguments, hooks=hooks)
        if ctx.is_main:
            atomic_write_json(job_dir / RESULT_FILE, summaries)


def main(argv: list[str]) -> int:
    """Entry point of each rank."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    job_dir = Path(argv[0])
    job = json.loads((job_dir / JOB_FILE).read_text())
    {"finetune": _finetune_rank, "pretrain": _pretrain_rank}[job["kind"]](job_dir, job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""How many processes a train request runs in (MONAI Label's `gpus` and `multi_gpu`), for both trainers."""

from __future__ import annotations

import logging
from pathlib import Path

from samora.distributed import ProcessPlan, plan_processes
from samora.serving.settings import AppSettings
from samora.serving.validation import UploadError, bool_param

log = logging.getLogger(__name__)

# Offered in each trainer's config(), so viewers show them: one process unless the client asks for several GPUs.
REQUEST_DEFAULTS = {"multi_gpu": False, "gpus": "all"}


def request_plan(request: dict, settings: AppSettings) -> ProcessPlan:
    """The processes for this request; a GPU that does not exist is the client's error (422)."""
    try:
        plan = plan_processes(
            settings.device,
            gpus=request.get("gpus", REQUEST_DEFAULTS["gpus"]),
            multi_gpu=bool_param(request, "multi_gpu", REQUEST_DEFAULTS["multi_gpu"]),
            cpu_processes=settings.dist_cpu_processes,
        )
    except UploadError:
        raise
    except ValueError as e:
        raise UploadError(str(e)) from e
    log.info("training processes: %s", plan.reason)
    return plan


def jobs_root(model_dir: Path) -> Path:
    """Where multi-process jobs keep their inputs while they run (next to the models, seen by every rank)."""
    return Path(model_dir) / "jobs"

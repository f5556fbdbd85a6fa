"""`samora_ssl` trainer: the stage-1 self-supervised bootstrap of the three LoRA experts on unlabeled studies."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.failures import training_failure_report
from lib.trainers.processes import REQUEST_DEFAULTS, jobs_root, request_plan
from lib.trainers.stats import StatsFile
from samora.config import EXPERTS
from samora.distributed.jobs import run_pretrain_job
from samora.serving.runtime import ModelRuntime
from samora.serving.validation import positive_int_param
from samora.ssl.pretraining import pretrain
from samora.ssl.trainer import RunHooks

log = logging.getLogger(__name__)


class SamoraBootstrapTrainer(TrainTask):
    """Image-, patch- and pixel-level SSL over the datastore's images (never their labels); then, where the experts
    act and a model version exists, `refresh` (the `samora` trainer) publishes a version trained with them."""

    def __init__(self, runtime: ModelRuntime, refresh: Callable[[dict, Datastore], dict] | None = None) -> None:
        super().__init__("SAMora stage-1 self-supervised bootstrap of the image/patch/pixel LoRA experts")
        self.runtime = runtime
        self.refresh = refresh
        self.stats_file = StatsFile(runtime.store.root / "train_stats_samora_ssl.json")

    def config(self) -> dict:
        steps, batch = self.runtime.settings.resolved_ssl()
        return {"max_steps": steps, "batch_size": batch, **REQUEST_DEFAULTS}

    def stats(self) -> dict:
        return self.stats_file.read()

    def __call__(self, request, datastore: Datastore) -> dict:
        params = {k: positive_int_param(request, k, self.config()[k]) for k in ("max_steps", "batch_size")}
        plan = request_plan(request, self.runtime.settings)
        start = time.time()
        ids = datastore.get_unlabeled_images() or datastore.list_images()
        if not ids:
            raise ValueError("the datastore has no images to pretrain on")
        studies = [datastore.get_image_uri(i) for i in sorted(ids)]
        total = params["max_steps"] * len(EXPERTS)

        def on_step(level: str, step: int, total_steps: int, loss: float) -> None:
            done = EXPERTS.index(level) * params["max_steps"] + step
            if step % 10 == 0 or step == total_steps:
                self.stats_file.write(
                    {
                        "status": "RUNNING",
                        "level": level,
                        "step": done,  # over all levels
                        "total_steps": total,
                        # MONAI Label's progress fields, which viewers read; stage 1 counts steps, not epochs
                        "epoch": done,
                        "total_epochs": total,
                        "loss": loss,
                        "best_metric": 0,
                        "total_time": f"{time.time() - start:.0f}s",
                        "start_ts": start,
                    }
                )

        arguments = {
            "studies": studies,
            "out_dir": str(self.runtime.store.experts_dir),
            "model_config": self.runtime.settings.model_config().to_dict(),
            "levels": list(EXPERTS),
            "settings": {
                "batch_size": params["batch_size"],
                "precision": self.runtime.settings.resolved_precision(through_encoder=True),
            },
            "max_steps": params["max_steps"],
            "device": self.runtime.settings.device,
        }
        if plan.launches:
            summary = run_pretrain_job(jobs_root(self.runtime.store.root), plan, arguments, on_step)
        else:
            summary = pretrain(**arguments, hooks=RunHooks(progress=False, log=log.info, on_step=on_step))
        final = {
            "status": "DONE",
            "step": total,
            "total_steps": total,
            "epoch": total,  # MONAI Label's progress fields (steps here)
            "total_epochs": total,
            "best_metric": 0,
            "total_time": f"{time.time() - start:.0f}s",
            "start_ts": start,
            "studies": len(studies),
            "processes": plan.nproc,
            "levels": {k: {"final_loss": v.get("final_loss"), "steps": v.get("steps")} for k, v in summary.items()},
        }
        self.stats_file.write(final)
        final["refreshed"] = self.refresh_version(request, datastore)
        return final

    def refresh_version(self, request: dict, datastore: Datastore) -> dict | None:
        """Train and publish a version with the new experts when they act and the served version predates them, so
        that annotators get them now rather than after their next saved label; None when there is nothing to do."""
        version = self.runtime.store.current_version()
        if self.refresh is None or not self.runtime.settings.experts_act() or not version:
            return None
        if not datastore.get_labeled_images(DefaultLabelTag.FINAL):
            return None
        log.info("SSL experts ready: training a model version with them (version %d predates them)", version)
        try:
            with training_failure_report("samora", self.refresh):  # the samora trainer's stats say why
                return self.refresh({k: request[k] for k in REQUEST_DEFAULTS if k in request}, datastore)
        except Exception as e:  # the experts are saved and the next training takes them: the bootstrap succeeded
            reason = getattr(e, "detail", None) or f"{type(e).__name__}: {e}"
            log.error("no model version with the new experts yet (%s); the next training will use them", reason)
            return {"status": "ERROR", "error": reason}

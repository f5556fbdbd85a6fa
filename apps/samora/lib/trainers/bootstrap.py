"""`samora_ssl` trainer: the stage-1 self-supervised bootstrap of the three LoRA experts on unlabeled studies."""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

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
    """Image-, patch- and pixel-level SSL over the datastore's images (never their labels)."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__("SAMora stage-1 self-supervised bootstrap of the image/patch/pixel LoRA experts")
        self.runtime = runtime
        self.stats_file = StatsFile(runtime.store.root / "train_stats_samora_ssl.json")

    def config(self) -> dict:
        s = self.runtime.settings
        return {"max_steps": s.ssl_steps, "batch_size": s.ssl_batch_size, **REQUEST_DEFAULTS}

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
        return final

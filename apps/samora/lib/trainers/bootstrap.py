"""`samora_ssl` trainer: the stage-1 self-supervised bootstrap of the three LoRA experts on unlabeled studies."""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.trainers.stats import StatsFile
from samora.serving.runtime import ModelRuntime
from samora.serving.validation import positive_int_param
from samora.ssl.trainer import pretrain

log = logging.getLogger(__name__)

LEVELS = ("image", "patch", "pixel")


class SamoraBootstrapTrainer(TrainTask):
    """Image-, patch- and pixel-level SSL over the datastore's images (never their labels)."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__("SAMora stage-1 self-supervised bootstrap of the image/patch/pixel LoRA experts")
        self.runtime = runtime
        self.stats_file = StatsFile(runtime.store.root / "train_stats_samora_ssl.json")

    def config(self) -> dict:
        s = self.runtime.settings
        return {"max_steps": s.ssl_steps, "batch_size": s.ssl_batch_size}

    def stats(self) -> dict:
        return self.stats_file.read()

    def __call__(self, request, datastore: Datastore) -> dict:
        params = {k: positive_int_param(request, k, default) for k, default in self.config().items()}
        start = time.time()
        ids = datastore.get_unlabeled_images() or datastore.list_images()
        if not ids:
            raise ValueError("the datastore has no images to pretrain on")
        studies = [datastore.get_image_uri(i) for i in sorted(ids)]
        total = params["max_steps"] * len(LEVELS)

        def on_step(level: str, step: int, total_steps: int, loss: float) -> None:
            done = LEVELS.index(level) * params["max_steps"] + step
            if step % 10 == 0 or step == total_steps:
                self.stats_file.write(
                    {
                        "status": "RUNNING",
                        "level": level,
                        "epoch": done,
                        "total_epochs": total,
                        "loss": loss,
                        "best_metric": 0,
                        "total_time": f"{time.time() - start:.0f}s",
                        "start_ts": start,
                    }
                )

        summary = pretrain(
            studies,
            self.runtime.store.experts_dir,
            self.runtime.settings.model_config(),
            levels=LEVELS,
            max_steps=params["max_steps"],
            batch_size=params["batch_size"],
            progress=False,
            log=log.info,
            on_step=on_step,
            device=self.runtime.settings.device,
        )
        final = {
            "status": "DONE",
            "epoch": total,
            "total_epochs": total,
            "best_metric": 0,
            "total_time": f"{time.time() - start:.0f}s",
            "start_ts": start,
            "studies": len(studies),
            "levels": {k: {"final_loss": v.get("final_loss"), "steps": v.get("steps")} for k, v in summary.items()},
        }
        self.stats_file.write(final)
        return final

"""`samora` infer task: prompt-free multi-organ segmentation of a whole volume."""

from __future__ import annotations

import logging
import tempfile
import time

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.errors import infer_errors
from samora.data import save_label
from samora.engine.inference import segment_volume
from samora.serving.labels import remap_model_output
from samora.serving.runtime import ModelRuntime
from samora.serving.validation import positive_int_param

log = logging.getLogger(__name__)


class SamoraSegmentation(InferTask):
    """Auto-segmentation: every axial slice through the current model; output on the input's exact grid."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=dict(runtime.settings.labels),
            dimension=3,
            description="SAMora prompt-free multi-organ segmentation (SAM + self-supervised LoRA experts)",
            config={"batch_size": runtime.settings.infer_batch_size},
        )
        self.runtime = runtime

    def is_valid(self) -> bool:
        return True

    def untrained_reason(self) -> str | None:
        """Why auto-segmentation cannot answer yet (no trained model version), or None when it can."""
        if self.runtime.store.current_version():
            return None
        every = self.runtime.settings.train_every
        when = (
            f"a training starts after every {every} saved final label(s) (conf train_every)"
            if every
            else "automatic training is off (conf train_every 0): start one with POST /train/samora"
        )
        return (
            "no trained model version yet: the class heads have never seen a label. Save final labels (use "
            f"samora_prompt boxes/clicks meanwhile; it works from the pretrained prompt path); {when}"
        )

    def info(self) -> dict:
        info = super().info()
        reason = self.untrained_reason()
        info["status"] = "untrained: " + reason if reason else f"model version {self.runtime.store.current_version()}"
        info["model"] = self.runtime.store.summary()
        info["encoder_path"] = self.runtime.encoder_info()
        return info

    def __call__(self, request) -> tuple[str, dict]:
        with infer_errors("samora", request.get("image")):
            return self._run(request)

    def _run(self, request) -> tuple[str, dict]:
        start = time.perf_counter()
        # the request is validated first: bad input is a 4xx of its own, whatever the model's state
        batch = positive_int_param(request, "batch_size", self.runtime.settings.infer_batch_size)
        volume, _ = self.runtime.volume(request["image"])
        reason = self.untrained_reason()
        if reason:
            raise HTTPException(status_code=409, detail=f"infer samora: {reason}")
        read = time.perf_counter()
        version, model = self.runtime.model()
        loaded = time.perf_counter()
        result = segment_volume(
            model,
            volume,
            encode_batch_size=batch,
            device=self.runtime.settings.device,
            embeddings=self.runtime.embedding_store(model),
        )
        served = dict(self.runtime.settings.labels)
        labels, dropped = remap_model_output(result.labels, dict(model.config.labels), served)
        if labels is not result.labels:
            log.warning(
                "model version %d numbers its classes %s; output renumbered by name onto the conf's labels %s%s",
                version,
                model.config.labels,
                served,
                f" (not in the conf, left out: {dropped})" if dropped else "",
            )
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        save_label(labels, volume.affine, out)
        done = time.perf_counter()
        log.info("segmented %s with model version %d in %.2fs", request["image"], version, done - start)
        return out, {
            "label_names": served,
            "model_version": version,
            "mean_entropy": result.mean_entropy,
            "latencies": {
                "pre": round(read - start, 4),
                "model_load": round(loaded - read, 4),
                "infer": round(result.timings["segment_s"], 4),
                "write": round(done - loaded - result.timings["segment_s"], 4),
                "total": round(done - start, 4),
            },
        }

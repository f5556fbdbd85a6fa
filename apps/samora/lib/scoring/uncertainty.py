"""`samora_uncertainty` scoring: mean predictive entropy over the body, stored per study with the model version."""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from samora.engine.inference import segment_volume
from samora.serving.runtime import ModelRuntime

log = logging.getLogger(__name__)
SCORE_KEY = "samora_uncertainty"


def stored_score(datastore: Datastore, image_id: str, version: int) -> float | None:
    """The study's uncertainty if it was scored with this model version, else None."""
    info = (datastore.get_image_info(image_id) or {}).get(SCORE_KEY)
    if isinstance(info, dict) and info.get("model_version") == version and info.get("score") is not None:
        return float(info["score"])
    return None


def score_images(runtime: ModelRuntime, datastore: Datastore, image_ids: list[str]) -> dict:
    """Score the given studies that lack a score for the current model version; returns counts."""
    version, model = runtime.model()
    if version == 0:
        # untrained class heads give every study the same meaningless entropy: rank only with a trained model
        log.info("uncertainty scoring skipped: no trained model version yet")
        return {"model_version": 0, "scored": {}, "skipped": len(image_ids), "reason": "no trained model version"}
    scored, skipped = {}, 0
    for image_id in image_ids:
        if stored_score(datastore, image_id, version) is not None:
            skipped += 1
            continue
        volume, _ = runtime.volume(datastore.get_image_uri(image_id))
        result = segment_volume(
            model,
            volume,
            encode_batch_size=runtime.settings.infer_batch_size,
            device=runtime.settings.device,
            embeddings=runtime.embedding_store(model),
        )
        scored[image_id] = result.mean_entropy
        datastore.update_image_info(image_id, {SCORE_KEY: {"score": result.mean_entropy, "model_version": version}})
        log.info("uncertainty of %s with model v%d: %.4f", image_id, version, result.mean_entropy)
    return {"model_version": version, "scored": scored, "skipped": skipped}


class SamoraUncertaintyScoring(ScoringMethod):
    """Scores unlabeled studies; studies already scored for the current model version are skipped."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__("Mean predictive entropy of the current SAMora model over each unlabeled study's body")
        self.runtime = runtime

    def __call__(self, request, datastore: Datastore) -> dict:
        return score_images(self.runtime, datastore, sorted(datastore.get_unlabeled_images()))

"""`uncertainty` strategy: the unlabeled study the current model is least sure about."""

from __future__ import annotations

import logging
import os
import random

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.dicomweb import SamoraDicomWebDatastore
from lib.scoring.uncertainty import score_images, stored_score
from samora.serving.runtime import ModelRuntime

log = logging.getLogger(__name__)


class UncertaintyStrategy(Strategy):
    """Scores what is missing for the current model version first, then returns the highest score."""

    def __init__(self, runtime: ModelRuntime) -> None:
        super().__init__("Highest SAMora predictive entropy among unlabeled studies")
        self.runtime = runtime

    def __call__(self, request, datastore: Datastore):
        if hasattr(datastore, "refresh"):
            datastore.refresh()  # pick up scores written by a scoring subprocess
        unlabeled = sorted(datastore.get_unlabeled_images())
        if not unlabeled:
            return None
        version = self.runtime.store.current_version() or 0
        if not version:
            # an untrained model's entropy is the same everywhere: no ranking until a version exists
            pick = random.choice(unlabeled)
            log.info("uncertainty strategy: no trained model version yet, picked %s at random", pick)
            self._prefetch(datastore, pick)
            return {"id": pick, "score": None, "model_version": 0, "strategy": "random"}
        missing = [i for i in unlabeled if stored_score(datastore, i, version) is None]
        if missing:
            score_images(self.runtime, datastore, missing)
        scores = {i: stored_score(datastore, i, version) for i in unlabeled}
        best = max(unlabeled, key=lambda i: (scores[i] if scores[i] is not None else float("-inf"), i))
        log.info("uncertainty strategy picked %s (score %s, model v%d)", best, scores[best], version)
        self._prefetch(datastore, best)
        return {"id": best, "score": scores[best], "model_version": version}

    def _prefetch(self, datastore: Datastore, image_id: str) -> None:
        """Encode the handed-out study in the background so the annotator's first click finds it warm (local
        files only: a PACS study is fetched by the first infer request, which starts the same pre-encoding)."""
        if isinstance(datastore, SamoraDicomWebDatastore):
            return
        try:
            path = datastore.get_image_uri(image_id)
        except Exception:  # noqa: BLE001 - a missing study only loses the warm start
            return
        if path and os.path.isfile(path):
            self.runtime.prefetch(path)

"""`uncertainty` strategy: the unlabeled study the current model is least sure about."""

from __future__ import annotations

import logging
import random

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

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
            return {"id": pick, "score": None, "model_version": 0, "strategy": "random"}
        missing = [i for i in unlabeled if stored_score(datastore, i, version) is None]
        if missing:
            score_images(self.runtime, datastore, missing)
        scores = {i: stored_score(datastore, i, version) for i in unlabeled}
        best = max(unlabeled, key=lambda i: (scores[i] if scores[i] is not None else float("-inf"), i))
        log.info("uncertainty strategy picked %s (score %s, model v%d)", best, scores[best], version)
        return {"id": best, "score": scores[best], "model_version": version}

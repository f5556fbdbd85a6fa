"""The model as the server sees it: current published version, reloaded on change, plus an embedding cache."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from samora.data import Letterbox, Volume, load_volume, slice_stack
from samora.engine.embeddings import EmbeddingStore
from samora.engine.encoder_path import PATHS, PathEncoder, ProbeResult
from samora.engine.encoder_path import select as select_encoder_path
from samora.engine.inference import normalised_volume
from samora.engine.store import ModelStore
from samora.model import SamoraModel
from samora.serving.settings import AppSettings

log = logging.getLogger(__name__)


class ModelRuntime:
    """Serves the newest published model; a new version is picked up on the next request, no restart.

    Version 0 means nothing was published yet: the untrained model, with SSL experts if they exist.
    Thread-safe: MONAI Label may run infer tasks in a thread pool.
    """

    def __init__(self, settings: AppSettings, model_dir: str | os.PathLike, embedding_cache_size: int = 256) -> None:
        self.settings = settings
        self.store = ModelStore(model_dir)
        self._lock = threading.RLock()
        self._model: SamoraModel | None = None
        self._version: int | None = None
        self._experts_stamp: float | None = None
        self._embeddings: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._volumes: OrderedDict[str, tuple[float, Volume, np.ndarray]] = OrderedDict()
        self._cache_size = embedding_cache_size
        self.encoder_calls = 0  # encoded slices; lets tests and logs show the cache working
        self.encoder_choice: ProbeResult | None = None  # chosen once per process (conf encoder_path, probe)
        self._encoder: PathEncoder | None = None  # the chosen path applied to the current model

    def _experts_stamp_now(self) -> float | None:
        files = self.store.expert_files()
        return max((f.stat().st_mtime for f in files), default=None)

    def model(self) -> tuple[int, SamoraModel]:
        """(version, model) of the current published version, loading it if it changed since last call."""
        with self._lock:
            version = self.store.current_version() or 0
            stamp = self._experts_stamp_now() if version == 0 else None
            if self._model is not None and version == self._version and stamp == self._experts_stamp:
                return self._version, self._model
            loaded = self.store.load_current(map_location=self.settings.device) if version else None
            if loaded is None:
                model = self.fresh_model()
                version = 0
            else:
                version, model = loaded
            model.eval()
            self._model, self._version, self._experts_stamp = model, version, stamp
            self._embeddings.clear()
            log.info("serving model version %d", version)
            return version, model

    def encoder(self) -> PathEncoder:
        """The current model's encoder on the chosen inference path (float32 embeddings). The path is chosen on the
        first call (probe when conf encoder_path is auto), so task subprocesses that never encode never probe."""
        with self._lock:
            _, model = self.model()
            if self.encoder_choice is None:
                self.encoder_choice = select_encoder_path(model, self.settings.device, self.settings.encoder_path)
                log.info("encoder path: %s", self.encoder_choice.chosen)
            if self._encoder is None or self._encoder.model is not model:
                self._encoder = PathEncoder(model, PATHS[self.encoder_choice.chosen], self.settings.device)
            return self._encoder

    def encoder_info(self) -> dict:
        """The chosen encoder path and what the probe measured (for /info and logs)."""
        self.encoder()
        return self.encoder_choice.to_dict()

    def fresh_model(self) -> SamoraModel:
        """An untrained model with the SSL experts loaded when the bootstrap has produced them."""
        model = SamoraModel(self.settings.model_config())
        if self.store.expert_files():
            from samora.ssl.experts_io import load_experts

            loaded = load_experts(model, self.store.experts_dir)
            log.info("loaded SSL experts %s", loaded)
        return model.to(self.settings.device)

    def volume(self, path: str) -> tuple[Volume, np.ndarray]:
        """The volume at `path` and its normalised copy, cached by path and mtime (prompts reuse them)."""
        with self._lock:
            mtime = Path(path).stat().st_mtime
            hit = self._volumes.get(path)
            if hit is not None and hit[0] == mtime:
                self._volumes.move_to_end(path)
                return hit[1], hit[2]
            volume = load_volume(path)
            scaled = normalised_volume(volume)
            self._volumes[path] = (mtime, volume, scaled)
            while len(self._volumes) > 4:
                self._volumes.popitem(last=False)
            return volume, scaled

    def embedding_store(self, model: SamoraModel) -> EmbeddingStore | None:
        """The on-disk slice embeddings this model's encoder shares with training and scoring (None: conf off)."""
        budget = int(self.settings.embedding_cache_gb * 2**30)
        if not budget:
            return None
        encoder = self.encoder() if model is self._model else None
        path = encoder.path.name if encoder is not None else "fp32"
        return EmbeddingStore(self.store.root / "embeddings", model, budget, encoder=encoder, path_name=path)

    @torch.no_grad()
    def slice_embedding(self, path: str, index: int) -> torch.Tensor:
        """Image embedding (1, C, h, w) of one axial slice, cached per (image, mtime, model version, slice)."""
        version, model = self.model()
        volume, scaled = self.volume(path)
        key = (path, Path(path).stat().st_mtime, version, int(index))
        with self._lock:
            hit = self._embeddings.get(key)
            if hit is not None:
                self._embeddings.move_to_end(key)
                return hit
        stack = torch.as_tensor(slice_stack(scaled, volume.axial_axis, index, model.config.context))[None]
        letterbox = Letterbox.for_volume(volume.affine, volume.shape, volume.axial_axis, model.config.image_size)
        embedding = self.encoder()(letterbox.image(stack).to(self.settings.device))
        with self._lock:
            self.encoder_calls += 1
            self._embeddings[key] = embedding
            while len(self._embeddings) > self._cache_size:
                self._embeddings.popitem(last=False)
        return embedding

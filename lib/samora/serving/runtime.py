"""The model as the server sees it: current published version, reloaded on change, plus an embedding cache."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from samora.data import Letterbox, Volume, load_volume, slice_stack
from samora.engine.embeddings import EmbeddingStore, encoder_fingerprint, slice_key
from samora.engine.encoder_path import PATHS, PathEncoder, ProbeResult
from samora.engine.encoder_path import select as select_encoder_path
from samora.engine.inference import normalised_volume
from samora.engine.store import ModelStore
from samora.model import SamoraModel
from samora.serving.decode_cache import DecodeCache, RecentAnswers, SliceMask
from samora.serving.embedding_cache import EmbeddingCache
from samora.serving.prefetch import Prefetcher
from samora.serving.settings import AppSettings

log = logging.getLogger(__name__)
PREFETCH_THREAD = "samora-prefetch"


class ModelRuntime:
    """Serves the newest published model; a new version is picked up on the next request, no restart.

    Version 0 means nothing was published yet: the untrained model, with SSL experts if they exist.
    Thread-safe: MONAI Label may run infer tasks in a thread pool.
    """

    def __init__(self, settings: AppSettings, model_dir: str | os.PathLike) -> None:
        self.settings = settings
        self.store = ModelStore(model_dir)
        self._lock = threading.RLock()
        self._model: SamoraModel | None = None
        self._version: int | None = None
        self._experts_stamp: float | None = None
        # slice embeddings of every task in this process (prompts, auto-segmentation, scoring), fp16, byte budget
        self.embeddings = EmbeddingCache(int(settings.embedding_memory_mb * 2**20))
        self.decodes = DecodeCache()  # prompt masks per (slice, prompt) of the served model
        self.click_answers = RecentAnswers()  # box answers after each click per (slice, clicks), for corrections
        self.prefetcher = Prefetcher(self.slice_embedding, self.is_cached, name=PREFETCH_THREAD)
        self._fingerprint: tuple[SamoraModel, str] | None = None
        self._volumes: OrderedDict[str, tuple[float, Volume, np.ndarray]] = OrderedDict()
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
            log.info("serving model version %d", version)
            return version, model

    def encoder(self) -> PathEncoder:
        """The current model's encoder on the chosen inference path (float32 embeddings). The path is chosen on the
        first call (probe when conf encoder_path is auto), so task subprocesses that never encode never probe."""
        with self._lock:
            _, model = self.model()
            if self.encoder_choice is None:
                self.encoder_choice = select_encoder_path(
                    model, self.settings.device, self.settings.encoder_path, record_dir=self.store.root
                )
                log.info("encoder path: %s", self.encoder_choice.chosen)
            if self._encoder is None or self._encoder.model is not model:
                built = self.encoder_choice.take_encoder(model)  # the probe's: not exported or folded twice
                path = PATHS[self.encoder_choice.chosen]
                self._encoder = built or PathEncoder(model, path, self.settings.device, graph_dir=self.store.root)
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

    def embedding_store(self, model: SamoraModel) -> CachedEmbeddings | EmbeddingStore | None:
        """Where auto-segmentation and scoring get slice embeddings: for the served model, the in-memory cache
        (shared with prompts) over the on-disk store shared with training; for another model, that store alone."""
        budget = int(self.settings.embedding_cache_gb * 2**30)
        if model is not self._model:
            return EmbeddingStore(self.store.root / "embeddings", model, budget) if budget else None
        encoder = self.encoder()
        disk = (
            EmbeddingStore(self.store.root / "embeddings", model, budget, encoder=encoder, path_name=encoder.path.name)
            if budget
            else None
        )
        return CachedEmbeddings(self, disk)

    def embedding_key(self, image: np.ndarray | torch.Tensor) -> tuple[str, str, str]:
        """Cache key of one model-input slice (3, S, S): its content, the encoder state, the encoder path."""
        encoder = self.encoder()
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        with self._lock:
            if self._fingerprint is None or self._fingerprint[0] is not encoder.model:
                self._fingerprint = (encoder.model, encoder_fingerprint(encoder.model))
            fingerprint = self._fingerprint[1]
        return slice_key(image), fingerprint, encoder.path.name

    def slice_input(self, path: str, index: int) -> torch.Tensor:
        """The model-input slice (1, 3, S, S) of axial slice `index`: normalised, context stack, letterboxed."""
        _, model = self.model()
        volume, scaled = self.volume(path)
        stack = torch.as_tensor(slice_stack(scaled, volume.axial_axis, index, model.config.context))[None]
        letterbox = Letterbox.for_volume(volume.affine, volume.shape, volume.axial_axis, model.config.image_size)
        return letterbox.image(stack)

    def cached_embedding(self, image: torch.Tensor, key: tuple | None = None, compute=None) -> torch.Tensor:
        """Embedding (1, C, h, w) of one model-input slice from the shared cache, encoded once if missing."""
        key = key or self.embedding_key(image[0])

        def encode() -> torch.Tensor:
            embedding = compute() if compute is not None else self.encoder()(image.to(self.settings.device))
            if threading.current_thread().name != PREFETCH_THREAD:
                with self._lock:
                    self.encoder_calls += 1
            return embedding

        return self.embeddings.get_or_compute(key, encode).to(self.settings.device)

    @torch.no_grad()
    def slice_embedding(self, path: str, index: int) -> torch.Tensor:
        """Image embedding (1, C, h, w) of one axial slice, from the cache shared by every task of the server."""
        with self.prefetcher.foreground() if threading.current_thread().name != PREFETCH_THREAD else _nothing():
            return self.cached_embedding(self.slice_input(path, index))

    def cached_decode(
        self, path: str, index: int, model: SamoraModel, prompt_key: bytes, decode: Callable[[], SliceMask]
    ) -> SliceMask:
        """decode() of a prompt on slice `index` of `path`, once per (file version, slice, prompt) and model."""
        key = (path, Path(path).stat().st_mtime_ns, int(index), prompt_key)
        return self.decodes.get_or_compute(model, key, decode)

    def cached_click_answer(self, path: str, index: int, model: SamoraModel, clicks_key: bytes, compute):
        """compute() of a click prompt's answer after some of its clicks (samora.serving.click_boxes), once per
        (file version, slice, clicks) and model among the recent ones."""
        key = (path, Path(path).stat().st_mtime_ns, int(index), clicks_key)
        return self.click_answers.get_or_compute(model, key, compute)

    def is_cached(self, path: str, index: int) -> bool:
        """Whether slice `index` of `path` is cached or being encoded."""
        return self.embedding_key(self.slice_input(path, index)[0]) in self.embeddings

    def prefetch(self, path: str, center: int | None = None) -> None:
        """Encode `path`'s slices in the background, nearest `center` (default: the middle) first."""
        volume, _ = self.volume(path)
        depth = volume.shape[volume.axial_axis]
        self.prefetcher.request(path, depth // 2 if center is None else int(center), depth)


@contextlib.contextmanager
def _nothing():
    yield


class CachedEmbeddings:
    """EmbeddingStore's `embed` over the runtime's in-memory cache, then the disk store (if any), then the encoder:
    what predict_slices uses for auto-segmentation and scoring, so they share embeddings with prompts."""

    def __init__(self, runtime: ModelRuntime, disk: EmbeddingStore | None) -> None:
        self.runtime, self.disk = runtime, disk

    def embed(self, model: SamoraModel, images: np.ndarray, batch_size: int = 1, device="cpu", on_progress=None):
        """(n, C, h, w) float16 embeddings of (n, 3, S, S) model-input slices."""
        out = []
        for image in images:
            compute = None
            if self.disk is not None:

                def compute(image=image, disk=self.disk):
                    return torch.as_tensor(disk.embed(model, image[None], device=device), dtype=torch.float32)

            tensor = torch.as_tensor(image[None], dtype=torch.float32)
            out.append(self.runtime.cached_embedding(tensor, compute=compute).cpu().numpy().astype(np.float16))
        return np.concatenate(out)

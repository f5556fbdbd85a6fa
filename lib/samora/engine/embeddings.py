"""Image embeddings of training slices, computed once and kept on disk, for training on a frozen encoder.

A slice is encoded once per (slice content, encoder state): the file name is the hash of the model-input slice,
the folder name the fingerprint of everything that shapes the encoder's output (preset, size, base weights,
experts, fusion, routing). A new expert or fusion state therefore lands in a new folder and never reuses stale
embeddings. Files are float16 and written atomically, so a killed training leaves only complete files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from samora.io_utils import atomic_save_npy
from samora.model import SamoraModel

log = logging.getLogger(__name__)


def encoder_fingerprint(model: SamoraModel) -> str:
    """Hash of what determines the embedding: backbone identity, routing, and the expert/fusion weights.

    The init seed counts only for a random-initialised backbone, and an attention site whose experts add nothing
    (its `idle()`: untrained experts, or HL-Attn's zero output projection) contributes no weights, so a pretrained
    encoder with idle experts has one fingerprint whatever the seed, and its embeddings are shared."""
    config = model.config
    identity = {
        "preset": config.preset,
        "image_size": config.image_size,
        "checkpoint": model.load_report.get("checkpoint"),
        "init_seed": None if model.backbone.pretrained else config.init_seed,
        "fusion": config.fusion,
        "context": config.context,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for index, site in enumerate(model.backbone.attention_sites()):
        if site.idle():
            continue
        digest.update(f"{index}:{site.mode}".encode())
        for key, value in sorted(site.state_dict().items()):
            if "lora_" in key or key.startswith("fusion."):
                digest.update(key.encode())
                digest.update(value.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:20]


def slice_key(image: np.ndarray) -> str:
    """Content hash of one model-input slice."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float16).tobytes()).hexdigest()[:32]


class EmbeddingStore:
    """A folder of per-slice embeddings for one encoder state, shared by every process that uses the same folder
    (training, the server's auto-segmentation, scoring) and kept under a byte budget by dropping the oldest files."""

    def __init__(
        self,
        root: str | Path,
        model: SamoraModel,
        max_bytes: int | None = None,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        path_name: str = "fp32",
    ) -> None:
        """`encoder` replaces model.encode (an inference path, samora.engine.encoder_path); its embeddings differ
        from fp32 in the last bits, so a path other than fp32 gets its own folder."""
        self.root = Path(root)
        fingerprint = encoder_fingerprint(model)
        self.directory = self.root / (fingerprint if path_name == "fp32" else f"{fingerprint}-{path_name}")
        self.max_bytes = max_bytes
        self.encoder = encoder

    def embed(
        self,
        model: SamoraModel,
        images: np.ndarray,
        batch_size: int = 1,  # LiteMedSAM on a CPU: 1.06 s/slice at batch 1, 1.44 at batch 4 (memory-bound)
        device: str | torch.device = "cpu",
        on_progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """(n, C, h, w) float16 embeddings of (n, 3, S, S) slices; only slices not on disk yet are encoded."""
        keys, missing = self.encode_missing(model, images, batch_size, device, on_progress)
        embeddings = np.stack([self._load(model, images, keys, i, device) for i in range(len(keys))])
        if missing:
            self.prune()
        return embeddings

    def encode_missing(
        self,
        model: SamoraModel,
        images: np.ndarray,
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        on_progress: Callable[[int, int], None] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[list[str], int]:
        """Encode the slices not on disk yet, or with several ranks this rank's share of them (every
        world_size-th); returns every slice's key and how many were missing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        keys = [slice_key(image) for image in images]
        missing = [i for i, key in enumerate(keys) if not self._path(key).is_file()]
        if missing and len(images) > 1:
            log.info("encoding %d of %d slices (the rest are cached in %s)", len(missing), len(keys), self.directory)
        mine = missing[rank::world_size]
        model.eval()
        for done, start in enumerate(range(0, len(mine), batch_size)):
            # checked again per chunk: another process sharing the folder may have encoded it meanwhile
            chunk = [i for i in mine[start : start + batch_size] if not self._path(keys[i]).is_file()]
            if chunk:
                self._encode(model, images, keys, chunk, device)
            if on_progress is not None:
                on_progress(min((done + 1) * batch_size, len(mine)), len(mine))
        return keys, len(missing)

    def stored(self, model: SamoraModel, images: np.ndarray, keys: list[str], device="cpu") -> StoredEmbeddings:
        """The slices' embeddings read from disk on access (encode_missing first)."""
        return StoredEmbeddings(self, model, images, keys, device)

    def _encode(self, model: SamoraModel, images: np.ndarray, keys: list[str], chunk: list[int], device) -> None:
        x = torch.as_tensor(images[chunk], dtype=torch.float32, device=device)
        with torch.no_grad():
            embeddings = (self.encoder or model.encode)(x).cpu().numpy().astype(np.float16)
        for i, embedding in zip(chunk, embeddings, strict=True):
            atomic_save_npy(self._path(keys[i]), embedding)

    def _load(self, model: SamoraModel, images: np.ndarray, keys: list[str], i: int, device) -> np.ndarray:
        try:
            return np.load(self._path(keys[i]))
        except FileNotFoundError:  # pruned by another process since it was written: encode it again
            self._encode(model, images, keys, [i], device)
            return np.load(self._path(keys[i]))

    def prune(self) -> int:
        """Delete the least recently written embeddings (of every encoder state) beyond the byte budget."""
        if not self.max_bytes:
            return 0
        files = []
        for path in self.root.glob("*/*.npy"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        if removed:
            log.info("embedding cache over %d bytes: removed the %d oldest slices", self.max_bytes, removed)
        return removed

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"


class StoredEmbeddings:
    """Embeddings of a slice set indexed like an array but read from the store per access, so a training holds
    one batch of them in memory whatever the size of the dataset."""

    def __init__(self, store: EmbeddingStore, model: SamoraModel, images: np.ndarray, keys: list[str], device) -> None:
        self.store, self.model, self.images, self.keys, self.device = store, model, images, keys, device

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index) -> np.ndarray:
        rows = np.atleast_1d(np.arange(len(self.keys))[index])
        return np.stack([self.store._load(self.model, self.images, self.keys, int(i), self.device) for i in rows])

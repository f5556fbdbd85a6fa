"""The server's slice embeddings in memory: one cache for prompts, auto-segmentation and scoring.

Keyed by (model-input slice content, encoder state, encoder path): the content hash of the letterboxed slice stands
for "image content + slice index + preprocessing", so the same study opened under another path or name, or by
another task, finds its embeddings; the encoder fingerprint (samora.engine.embeddings.encoder_fingerprint) changes
only when the encoder does, so a new model version trained on a frozen encoder keeps the cache warm. Entries are
float16 (half the bytes; the decoders get float32 back), dropped least recently used beyond a byte budget.

Single flight: a slice being encoded by one thread (a prompt, the background pre-encoder) is waited for by any
other thread that needs it, never encoded twice at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable

import torch

from samora.serving.lru import CostLRU


class EmbeddingCache:
    """LRU of float16 embeddings under `max_bytes`; thread-safe; `encoded` counts computed entries."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.encoded = 0
        self._entries: CostLRU[torch.Tensor] = CostLRU(max_bytes, _tensor_bytes)
        self._in_flight: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries or key in self._in_flight

    @property
    def nbytes(self) -> int:
        return self._entries.total

    @property
    def evicted(self) -> int:
        return self._entries.evicted

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The float32 embedding under `key`, or None (no waiting)."""
        with self._lock:
            hit = self._entries.get(key)
        return None if hit is None else hit.float()

    def put(self, key: Hashable, embedding: torch.Tensor) -> torch.Tensor:
        """Keep the float16 copy of `embedding` (if it fits the budget); returns that copy."""
        stored = embedding.detach().to("cpu", torch.float16).contiguous()
        with self._lock:
            self._entries.put(key, stored)
        return stored

    def get_or_compute(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached embedding, or compute() once however many threads ask for it at the same time."""
        while True:
            with self._lock:
                hit = self._entries.get(key)
                if hit is not None:
                    return hit.float()
                pending = self._in_flight.get(key)
                if pending is None:
                    self._in_flight[key] = threading.Event()
                    break
            pending.wait()  # the other thread's result (or its failure: then compute it here)
            if not self.max_bytes:
                break  # nothing is kept: compute it here rather than loop
        try:
            # the caller gets the float16-rounded values that later hits will get: the same prompt must give the
            # same mask whether its slice was just encoded or came from the cache
            stored = self.put(key, compute())
            with self._lock:
                self.encoded += 1
            return stored.float()
        finally:
            with self._lock:
                event = self._in_flight.pop(key, None)
            if event is not None:
                event.set()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

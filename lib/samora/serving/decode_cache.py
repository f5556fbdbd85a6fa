"""The server's decoded prompt masks in memory: each (slice, prompt box and clicks) decoded once per model.

An annotator's next prompt on a study is mostly the last one again: the same 3D box with one more click, or the same
box after a look elsewhere. Propagation prompts each slice with the previous slice's mask box, so after the changed
slice or two it falls back onto the boxes of the last request, and those slices need no decoder pass. Entries are
the bit-packed mask with its stability and confidence (a 512x512 slice: 32 KiB), dropped least recently used beyond
a byte budget, and all dropped when the served model changes (a new version may decode differently).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

DECODE_CACHE_BYTES = 64 * 2**20  # ~2000 decoded 512x512 slices: a few 3D boxes with all their margin retries


@dataclass(frozen=True)
class SliceMask:
    """One decoded slice: the mask on the slice grid, SAM's stability score of its logits, and the model's confidence
    in it (predicted IoU x stability)."""

    mask: np.ndarray
    stability: float
    confidence: float


@dataclass(frozen=True)
class _Packed:
    bits: np.ndarray
    shape: tuple[int, ...]
    stability: float
    confidence: float

    @classmethod
    def of(cls, decoded: SliceMask) -> _Packed:
        return cls(np.packbits(decoded.mask, axis=None), decoded.mask.shape, decoded.stability, decoded.confidence)

    def unpack(self) -> SliceMask:
        count = int(np.prod(self.shape))
        mask = np.unpackbits(self.bits, count=count).astype(bool).reshape(self.shape)
        return SliceMask(mask, self.stability, self.confidence)


class DecodeCache:
    """LRU of decoded slice masks under `max_bytes`, scoped to one model object; thread-safe."""

    def __init__(self, max_bytes: int = DECODE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.decoded = 0  # computed entries (cache misses); lets tests and benchmarks show the cache working
        self._entries: OrderedDict[Hashable, _Packed] = OrderedDict()
        self._owner: object | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(self, owner: object, key: Hashable, compute: Callable[[], SliceMask]) -> SliceMask:
        """The mask decoded under `key` by `owner` (the model), or compute() and keep it."""
        with self._lock:
            if owner is not self._owner:
                self._drop_all()
                self._owner = owner
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit.unpack()
        decoded = compute()
        packed = _Packed.of(decoded)
        with self._lock:
            self.decoded += 1
            if owner is self._owner and packed.bits.nbytes <= self.max_bytes:
                self._keep(key, packed)
        return decoded

    def _keep(self, key: Hashable, packed: _Packed) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.bits.nbytes
        self._entries[key] = packed
        self.nbytes += packed.bits.nbytes
        while self.nbytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.bits.nbytes

    def _drop_all(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def clear(self) -> None:
        with self._lock:
            self._drop_all()


class RecentAnswers:
    """The last `size` values computed under a key by one owner (the model), least recently used dropped first, all
    dropped when the owner changes; thread-safe. Holds the box answers after each click of recent click prompts, so
    that a correction click decodes only its own edit (samora.serving.click_boxes; 256 KiB each)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.computed = 0  # cache misses, for tests and benchmarks
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self._owner: object | None = None
        self._lock = threading.Lock()

    def get_or_compute(self, owner: object, key: Hashable, compute: Callable[[], object]) -> object:
        with self._lock:
            if owner is not self._owner:
                self._entries.clear()
                self._owner = owner
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = compute()
        with self._lock:
            self.computed += 1
            if owner is self._owner:
                self._entries[key] = value
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

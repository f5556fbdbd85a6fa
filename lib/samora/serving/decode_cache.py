"""The server's decoded prompt masks in memory: each (slice, prompt box and clicks) decoded once per model.

An annotator's next prompt on a study is mostly the last one again: the same 3D box with one more click, or the same
box after a look elsewhere. Propagation prompts each slice with the previous slice's mask box, so after the changed
slice or two it falls back onto the boxes of the last request, and those slices need no decoder pass. Entries are
the bit-packed mask with its stability and confidence (a 512x512 slice: 32 KiB), dropped least recently used beyond
a byte budget, and all dropped when the served model changes (a new version may decode differently).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from samora.serving.lru import OwnedCache

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
    """LRU of decoded slice masks, bit-packed, under `max_bytes`, scoped to one model object; thread-safe."""

    def __init__(self, max_bytes: int = DECODE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._packed: OwnedCache[_Packed] = OwnedCache(max_bytes, lambda packed: packed.bits.nbytes)

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def nbytes(self) -> int:
        return self._packed.total_cost

    @property
    def decoded(self) -> int:
        """Computed entries (cache misses); lets tests and benchmarks show the cache working."""
        return self._packed.computed

    def get_or_compute(self, owner: object, key: Hashable, compute: Callable[[], SliceMask]) -> SliceMask:
        """The mask decoded under `key` by `owner` (the model), or compute() and keep it."""
        return self._packed.get_or_compute(owner, key, lambda: _Packed.of(compute())).unpack()

    def clear(self) -> None:
        self._packed.clear()


class RecentAnswers(OwnedCache[object]):
    """The last `size` values computed under a key by one owner (the model). Holds the box answers after each click
    of recent click prompts, so that a correction click decodes only its own edit (samora.serving.click_boxes;
    256 KiB each)."""

    def __init__(self, size: int = 64) -> None:
        super().__init__(size, lambda _: 1)

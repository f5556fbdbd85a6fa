"""Background pre-encoding of a study's slices, nearest the prompted slice first, always behind foreground work.

One daemon thread. A new request replaces the study being pre-encoded (the annotator moved on). Before each slice
the thread waits while any foreground request (a prompt, an auto-segmentation) is running, so a prompt never waits
behind background encoding of other slices. The slice already started when a request arrives is cancelled on the
OpenVINO paths (polled every few ms; it is encoded again first when the request ends) and finishes beside the request
on the others. A foreground request that needs the very slice in progress waits for that result, or encodes it
itself when it was cancelled (EmbeddingCache).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from samora.engine.onnx_encoder import EncodeCancelled, cancellable

log = logging.getLogger(__name__)


def nearest_first(center: int, depth: int) -> list[int]:
    """0..depth-1 ordered by distance from `center` (ties: the lower slice first)."""
    center = min(max(center, 0), depth - 1)
    return sorted(range(depth), key=lambda k: (abs(k - center), k))


class Prefetcher:
    """Encodes requested studies' slices in the background through `encode(path, k)` (which fills the cache)."""

    def __init__(
        self, encode: Callable[[str, int], object], is_cached: Callable[[str, int], bool], name: str = "prefetch"
    ) -> None:
        self._encode, self._is_cached, self.name = encode, is_cached, name
        self._job: tuple[str, list[int]] | None = None
        self._foreground = 0
        self._stopped = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.encoded = 0  # slices this thread encoded (tests, logs)
        self.cancelled = 0  # slice encodes given up mid-way for a foreground request

    def request(self, path: str, center: int, depth: int) -> None:
        """Pre-encode `path`'s `depth` axial slices from `center` outwards (replaces any earlier study)."""
        with self._cond:
            self._job = (path, nearest_first(center, depth))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @contextlib.contextmanager
    def foreground(self):
        """Mark a foreground request; background encoding pauses (between slices) until none is left."""
        with self._cond:
            self._foreground += 1
        try:
            yield
        finally:
            with self._cond:
                self._foreground -= 1
                self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """Whether no study is waiting to be pre-encoded."""
        with self._cond:
            return self._job is None

    def _foreground_waiting(self) -> bool:
        return self._foreground > 0  # an int read needs no lock; a stale value only delays the cancel by a poll

    def _retry_first(self, path: str, k: int) -> None:
        with self._cond:
            if self._job is None:
                self._job = (path, [k])
            elif self._job[0] == path:
                self._job[1].insert(0, k)

    def _next(self) -> tuple[str, int] | None:
        """(path, slice) to encode next, after waiting for foreground work to end; None: stopped."""
        with self._cond:
            while not self._stopped and (self._job is None or self._foreground):
                self._cond.wait()
            if self._stopped:
                return None
            path, order = self._job
            k = order.pop(0)
            if not order:
                self._job = None
            return path, k

    def _run(self) -> None:
        while (step := self._next()) is not None:
            path, k = step
            if self._is_cached(path, k):
                continue
            try:
                with cancellable(self._foreground_waiting):
                    self._encode(path, k)
                self.encoded += 1
            except EncodeCancelled:  # a request arrived mid-slice: it gets the cores, the slice comes first later
                self.cancelled += 1
                self._retry_first(path, k)
            except Exception:  # a deleted or unreadable study: drop it, keep the thread for the next one
                log.exception("background pre-encoding of %s slice %d failed; study skipped", path, k)
                with self._cond:
                    if self._job is not None and self._job[0] == path:
                        self._job = None

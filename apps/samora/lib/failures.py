"""A failed training says why: in the app's log, in the trainer's stats (/info) and in /train's task details."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def training_failure_report(model: str, trainer) -> Iterator[None]:
    """Log the reason as one line and mark the trainer's stats ERROR, then let the task fail as before.

    MONAI Label keeps a task's last 20 output lines as its /train details and marks it ERROR on a non-zero exit;
    the re-raised exception's last traceback line is the reason again. Without the stats update 3D Slicer would
    show a failed run as RUNNING forever.
    """
    try:
        yield
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        log.error("training %s failed: %s", model, reason)
        stats = getattr(trainer, "stats_file", None)
        if stats is not None:
            stats.write({**stats.read(), "status": "ERROR", "error": reason, "end_ts": time.time()})
        raise

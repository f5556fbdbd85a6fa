"""A failed training says why: in the app's log, in the trainer's stats (/info) and in /train's task details."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException

from lib.errors import CLIENT_ERRORS, server_api

log = logging.getLogger(__name__)


@contextmanager
def training_failure_report(model: str, trainer) -> Iterator[None]:
    """Log the reason as one line and mark the trainer's stats ERROR, then fail the task with that reason.

    In a task subprocess (the normal, background path) the exception is re-raised: MONAI Label keeps a task's last
    20 output lines as its /train details and marks it ERROR on a non-zero exit, and the traceback's last line is the
    reason again. Inside the server (`run_sync=true`) the caller gets the reason as the HTTP answer: 422 for a
    problem with the request or the datastore's data, 500 otherwise, instead of a bare Internal Server Error.
    Without the stats update 3D Slicer would show a failed run as RUNNING forever.
    """
    try:
        yield
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        log.error("training %s failed: %s", model, reason)
        stats = getattr(trainer, "stats_file", None)
        if stats is not None:
            stats.write({**stats.read(), "status": "ERROR", "error": reason, "end_ts": time.time()})
        if server_api() is None:
            raise
        status = 422 if isinstance(e, (ValueError, *CLIENT_ERRORS)) else 500
        raise HTTPException(status_code=status, detail=f"training {model} failed: {reason}") from e

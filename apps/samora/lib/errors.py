"""Map the library's input errors to HTTP 4xx answers with their message (never a 500 stack trace)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException

from samora.data import VolumeError
from samora.serving.interactive import PromptError
from samora.serving.labels import LabelMappingError
from samora.serving.validation import UploadError

log = logging.getLogger(__name__)
CLIENT_ERRORS = (VolumeError, PromptError, LabelMappingError, UploadError, json.JSONDecodeError, FileNotFoundError)


@contextmanager
def client_errors(action: str) -> Iterator[None]:
    """Turn a client's bad input into HTTP 422 (400 for missing files) naming the problem."""
    try:
        yield
    except HTTPException:
        raise
    except CLIENT_ERRORS as e:
        status = 404 if isinstance(e, FileNotFoundError) else 422
        log.warning("%s refused: %s", action, e)
        raise HTTPException(status_code=status, detail=f"{action}: {e}") from e
    except MemoryError as e:
        raise HTTPException(status_code=413, detail=f"{action}: input too large for this server's memory") from e

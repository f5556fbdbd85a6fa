"""Map the library's input errors to HTTP 4xx answers with their message (never a 500 stack trace)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from samora.data import VolumeError
from samora.data.dicom_grid import GridMismatch
from samora.data.dicom_seg import SegError
from samora.data.volumes import VolumeTooLarge, volume_suffix
from samora.serving.interactive import PromptError
from samora.serving.labels import LabelMappingError
from samora.serving.validation import UploadError

log = logging.getLogger(__name__)
CLIENT_ERRORS = (
    VolumeError,
    PromptError,
    LabelMappingError,
    UploadError,
    GridMismatch,
    SegError,
    json.JSONDecodeError,
    FileNotFoundError,
)


def study_id(path: str) -> str:
    """The datastore id of an image file (its name without the volume suffix): what a client calls the study."""
    name = os.path.basename(str(path).rstrip(os.sep))
    return name[: len(name) - len(volume_suffix(name))]


def infer_errors(task: str, image: str | None):
    """client_errors for an infer request on `image` (the server's file of the study), naming the study."""
    return client_errors(f"infer {task} on {study_id(image or '')}", {image: study_id(image)} if image else None)


@contextmanager
def client_errors(action: str, shown: dict[str, str] | None = None) -> Iterator[None]:
    """Turn a client's bad input into HTTP 422 (404 for missing files, 413 over the memory budget) naming it.

    `shown` maps server-side files to what the client calls them (the study id, "the uploaded label"): the answer
    names those, never a path of the server."""
    try:
        yield
    except HTTPException:
        raise
    except CLIENT_ERRORS as e:
        status = 404 if isinstance(e, FileNotFoundError) else 413 if isinstance(e, VolumeTooLarge) else 422
        log.warning("%s refused: %s", action, e)
        message = str(e)
        for path, name in (shown or {}).items():
            message = message.replace(str(path), name)
        raise HTTPException(status_code=status, detail=f"{action}: {message}") from e
    except MemoryError as e:
        raise HTTPException(status_code=413, detail=f"{action}: input too large for this server's memory") from e


# MONAI Label 0.8.5 json.loads its form fields (`params`, `info`) inside its own endpoints, before any app code runs,
# so a malformed field escapes as a 500. Its FastAPI app is already started when our app exists (the app is created
# in the lifespan), so add_middleware is refused; exception handlers are read when the middleware stack is built,
# hence the handler is registered and the stack is dropped for Starlette to rebuild on the next request.
FORM_JSON_FIELDS = ("params", "info")
ENDPOINTS_DIR = os.sep + os.path.join("monailabel", "endpoints") + os.sep


def server_api():
    """MONAI Label's FastAPI app when this code runs inside the server process; None in its task subprocesses."""
    return getattr(sys.modules.get("monailabel.app"), "app", None)


def install_form_json_handler() -> None:
    """Answer 422 naming the field when a MONAI Label endpoint fails on a malformed JSON form field."""
    api = server_api()
    if api is None or api.exception_handlers.get(ValueError) is _form_json_error:
        return
    api.add_exception_handler(ValueError, _form_json_error)  # json.JSONDecodeError is a ValueError
    api.add_exception_handler(TypeError, _form_json_error)  # dict.update() on a JSON list, string or number
    api.middleware_stack = None


def _form_json_error(request: Request, exc: Exception) -> JSONResponse:
    field = _bad_form_field(exc)
    if field is None:
        raise exc  # not a malformed field: a real server error, answered 500 as before
    name, value = field
    log.warning("%s refused: form field %s=%.200r is not a JSON object", request.url.path, name, value)
    detail = f"form field {name!r} must be a JSON object: {_json_problem(value)}"
    return JSONResponse(status_code=422, content={"detail": detail})


def _bad_form_field(exc: Exception) -> tuple[str, str] | None:
    """(name, value) of the malformed JSON field when `exc` was raised by a MONAI Label endpoint's own code."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    frames = [f for f in frames if os.path.dirname(json.__file__) != os.path.dirname(f.f_code.co_filename)]
    if not frames or ENDPOINTS_DIR not in frames[-1].f_code.co_filename:
        return None  # raised inside app or library code, not while MONAI Label read the request
    local = frames[-1].f_locals
    for name in FORM_JSON_FIELDS:
        value = local.get(name)
        if isinstance(value, str) and _json_problem(value):
            return name, value
    return None


def _json_problem(value: str) -> str:
    """Why `value` is not a JSON object, or "" if it is one."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e})"
    return "" if isinstance(parsed, dict) else f"JSON {type(parsed).__name__}, not an object"

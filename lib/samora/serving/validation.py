"""Checks on what clients upload, so bad input is refused with a message before anything is saved."""

from __future__ import annotations

import numpy as np

from samora.data import VolumeError, load_label, load_volume
from samora.data.volumes import VolumeTooLarge
from samora.serving.labels import LabelMappingError


class UploadError(ValueError):
    """An uploaded label cannot be accepted; the message names the problem."""


def positive_int_param(params: dict, key: str, default: int) -> int:
    """An optional positive integer request parameter ("8" from a form is fine); anything else is the client's error."""
    value = params.get(key, default)
    digits = isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip().isdigit()
    if not digits or int(value) < 1:
        raise UploadError(f"param {key!r} must be a positive integer, got {value!r}")
    return int(value)


def positive_float_param(params: dict, key: str, default: float) -> float:
    """An optional finite positive number ("1e-3" from a form is fine); anything else is the client's error."""
    value = params.get(key, default)
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number <= 0:
        raise UploadError(f"param {key!r} must be a positive number, got {value!r}")
    return number


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def parse_flag(value) -> bool | None:
    """A boolean from JSON or text (bool("false") would be True); None when it is neither."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in TRUE_WORDS else False if text in FALSE_WORDS else None


def bool_param(params: dict, key: str, default: bool) -> bool:
    """An optional flag of a request: true/false (JSON) or one of TRUE_WORDS / FALSE_WORDS from a form."""
    value = params.get(key, default)
    flag = parse_flag(value)
    if flag is None:
        raise UploadError(f"param {key!r} must be true or false, got {value!r}")
    return flag


def validate_label_upload(
    label_path: str, image_path: str, labels: dict[str, int], label_info: list[dict] | None
) -> None:
    """Refuse a label whose grid differs from its image or whose values are not configured labels."""
    try:
        image = load_volume(image_path, check=False)
        data, _ = load_label(label_path, like=image)
    except VolumeTooLarge:
        raise  # answered 413, not 422
    except VolumeError as e:
        raise UploadError(str(e)) from e
    values = set(np.unique(data).tolist()) - {0}
    if label_info:
        named = {int(e["idx"]) for e in label_info if isinstance(e, dict) and "idx" in e}
        unknown_names = [e.get("name") for e in label_info if isinstance(e, dict) and e.get("name") not in labels]
        if values - named:
            raise UploadError(f"label values {sorted(values - named)} have no entry in label_info {label_info}")
        if unknown_names and len(unknown_names) == len(label_info):
            raise UploadError(f"none of the label names {unknown_names} is a configured label {sorted(labels)}")
    elif values - set(labels.values()):
        raise LabelMappingError(
            f"label values {sorted(values - set(labels.values()))} are not among the configured labels {labels}"
        )

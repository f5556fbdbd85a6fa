"""Label remapping: viewers number segments in their own order; classes are matched by name."""

from __future__ import annotations

import numpy as np


class LabelMappingError(ValueError):
    """A label volume cannot be mapped onto the model's classes; the message names the values."""


def remap_by_name(labels: np.ndarray, label_info: list[dict] | None, model_labels: dict[str, int]) -> np.ndarray:
    """Map a viewer's label values to the model's indices using [{"name", "idx"}]; unknown names become 0.

    Without label_info the values are taken as model indices already, and values outside them are an error.
    """
    labels = np.asarray(labels)
    out = np.zeros_like(labels, dtype=np.uint8)  # keeps the layout (Fortran for model output: NIfTI's)
    if not label_info:
        valid = set(model_labels.values()) | {0}
        unknown = sorted(set(np.unique(labels).tolist()) - valid)
        if unknown:
            raise LabelMappingError(f"label values {unknown} are not among the configured labels {model_labels}")
        return labels.astype(np.uint8)
    lookup = {name.lower(): idx for name, idx in model_labels.items()}
    for entry in label_info:
        name, idx = str(entry.get("name", "")), entry.get("idx")
        if idx is None:
            continue
        target = lookup.get(name.lower())
        if target is not None:
            out[labels == int(idx)] = target
    return out


def remap_model_output(
    labels: np.ndarray, model_labels: dict[str, int], served_labels: dict[str, int]
) -> tuple[np.ndarray, list[str]]:
    """A model's output renumbered by organ name onto the served map (the app's conf); returns it with the names
    the model knows but the served map lacks (written as 0)."""
    if model_labels == served_labels:
        return labels, []
    served = {name.lower() for name in served_labels}
    dropped = [name for name in model_labels if name.lower() not in served]
    as_info = [{"name": name, "idx": idx} for name, idx in model_labels.items()]
    return remap_by_name(labels, as_info, served_labels), dropped

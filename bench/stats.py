"""Numbers over seeds: JSON values back to floats, the finite ones, mean and standard deviation."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def as_float(value: Any) -> float:
    """Inverse of json_safe for numbers: null -> NaN, "inf" -> inf."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return float(value)
    return float(value)


def finite(values: Iterable[Any]) -> list[float]:
    """The finite values among `values` (None, NaN, inf dropped)."""
    out = []
    for v in values:
        f = as_float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def mean_std(values: Iterable[Any]) -> tuple[float, float]:
    """Mean and (population) standard deviation of the finite values; NaN, NaN if none."""
    vals = finite(values)
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals))

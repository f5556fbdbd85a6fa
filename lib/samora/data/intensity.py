"""Intensity windows that map CT (Hounsfield) or MR (percentile) intensities to [0, 1] for SAM's input."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["IntensityWindow", "default_for", "normalise", "set_ct_window"]

WINDOW_KINDS = ("hu", "percentile")
# Above this many foreground voxels percentiles are taken on a strided sample: same answer to <1%, bounded cost.
_PERCENTILE_SAMPLE = 2_000_000


@dataclass(frozen=True)
class IntensityWindow:
    """A clip range: absolute Hounsfield units ("hu") or percentiles of the volume's foreground ("percentile")."""

    kind: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.kind not in WINDOW_KINDS:
            raise ValueError(f"window kind must be one of {WINDOW_KINDS}, got {self.kind!r}")
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"window needs finite low < high, got [{self.low}, {self.high}]")
        if self.kind == "percentile" and not (0.0 <= self.low and self.high <= 100.0):
            raise ValueError(f"percentile window must lie in [0, 100], got [{self.low}, {self.high}]")

    @classmethod
    def ct_abdomen(cls) -> IntensityWindow:
        """Standard abdominal soft-tissue window, [-125, 275] HU."""
        return cls("hu", -125.0, 275.0)

    @classmethod
    def ct_soft_tissue(cls) -> IntensityWindow:
        """Slightly wider soft-tissue window, [-160, 240] HU."""
        return cls("hu", -160.0, 240.0)

    @classmethod
    def from_level_width(cls, level: float, width: float) -> IntensityWindow:
        """A Hounsfield window given as radiologists write it: centre level and width."""
        return cls("hu", level - width / 2.0, level + width / 2.0)

    @classmethod
    def ct_wide(cls) -> IntensityWindow:
        """Wide window that keeps lung and bone, [-1000, 1000] HU."""
        return cls("hu", -1000.0, 1000.0)

    @classmethod
    def mr(cls) -> IntensityWindow:
        """MR has no absolute scale: clip to the 0.5-99.5 percentiles of the foreground."""
        return cls("percentile", 0.5, 99.5)

    @classmethod
    def default_for(cls, modality: str) -> IntensityWindow:
        """Default window for "CT" (level 40 / width 400 HU unless set_ct_window changed it) or "MR" (percentile)."""
        modality = modality.upper()
        if modality == "CT":
            return _ct_window
        if modality == "MR":
            return cls.mr()
        raise ValueError(f"no default intensity window for modality {modality!r} (expected CT or MR)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityWindow:
        """Inverse of to_dict."""
        return cls(str(data["kind"]), float(data["low"]), float(data["high"]))


# LiteMedSAM's CT preprocessing: soft-tissue window level 40 / width 400 HU = [-160, 240].
_ct_window = IntensityWindow.from_level_width(40.0, 400.0)


def set_ct_window(window: IntensityWindow) -> None:
    """The CT window of every default_for("CT") in this process (the app's conf ct_window)."""
    global _ct_window
    if window.kind != "hu":
        raise ValueError(f"a CT window is in Hounsfield units, got kind {window.kind!r}")
    _ct_window = window


def default_for(modality: str) -> IntensityWindow:
    """Default window for a modality; same as IntensityWindow.default_for."""
    return IntensityWindow.default_for(modality)


def window_bounds(array: np.ndarray, window: IntensityWindow) -> tuple[float, float]:
    """The absolute (low, high) intensity bounds a window resolves to on this array."""
    if window.kind == "hu":
        return window.low, window.high
    values = np.asarray(array).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    # background (air outside the body, zero padding) is the minimum value in MR: leave it out so that the
    # percentiles describe the anatomy, not how much empty field of view the scan happens to have
    foreground = values[values > values.min()]
    if foreground.size == 0:
        return float(values.min()), float(values.min())
    if foreground.size > _PERCENTILE_SAMPLE:
        foreground = foreground[:: foreground.size // _PERCENTILE_SAMPLE]
    low, high = np.percentile(foreground, [window.low, window.high])
    return float(low), float(high)


def normalise(array: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Clip to the window and scale to float32 [0, 1]; constant input (or an empty window) gives zeros."""
    array = np.asarray(array)
    low, high = window_bounds(array, window)
    finite = np.isfinite(array)
    if not finite.any() or high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    finite_values = array[finite] if not finite.all() else array
    if float(finite_values.min()) == float(finite_values.max()):
        return np.zeros(array.shape, dtype=np.float32)
    # clip after scaling (not before) so float32 rounding can never leave [0, 1]
    out = (array.astype(np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
    out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)

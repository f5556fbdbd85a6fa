"""Shared data volumes put onto a larger grid, for benchmarks that need a clinical-size study (512x512x100)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from samora.data import load_volume


def on_grid(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The volume at `path` resampled by nearest neighbour onto `shape` (real anatomy, not noise), and the affine of
    that grid (same extent, finer voxels)."""
    volume = load_volume(path, check=False)
    index = [
        np.minimum((np.arange(n) * s / n).astype(int), s - 1) for n, s in zip(shape, volume.array.shape, strict=True)
    ]
    array = volume.array[np.ix_(*index)]
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * (np.array(volume.array.shape) / np.array(shape))
    return array, affine


def label_value(case: Path, name: str) -> int:
    """The label value of structure `name` in a shared-data case's labels.json."""
    labels = json.loads((case / "labels.json").read_text())["labels"]
    values = [int(value) for value, label in labels.items() if label == name]
    if not values:
        raise KeyError(f"{case / 'labels.json'} has no structure {name!r}")
    return values[0]

"""Labelled training slices of stage 2: read from (image, label) volumes, letterboxed to the model size, and
saved as memory-mappable arrays for training processes."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from samora.data import IntensityWindow, Letterbox, load_label, load_volume, normalise, slice_stack
from samora.io_utils import atomic_save_npy, atomic_write_json

__all__ = ["LabeledSlices", "concat_slices", "hold_out_last_study", "load_labeled_cases", "slices_from_arrays"]

MIN_STUDIES_FOR_HOLDOUT = 4  # below this every labelled study trains


@dataclass
class LabeledSlices:
    """Training slices resized to the model size: images (n, 3, S, S) float16 in [0,1], labels (n, S, S) uint8."""

    images: np.ndarray
    labels: np.ndarray
    case_ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> LabeledSlices:
        """Slices at the given indices."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabeledSlices(self.images[idx], self.labels[idx], [self.case_ids[i] for i in idx])

    def save(self, directory: str | Path) -> None:
        """Write the slices as .npy files (case ids last), so that training processes can memory-map them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("images", "labels"):
            atomic_save_npy(directory / f"{name}.npy", getattr(self, name))
        atomic_write_json(directory / "case_ids.json", self.case_ids)

    @classmethod
    def open(cls, directory: str | Path) -> LabeledSlices:
        """Slices written by `save`, memory-mapped read-only: each process pages in the batches it reads."""
        directory = Path(directory)
        images, labels = (np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("images", "labels"))
        return cls(images, labels, json.loads((directory / "case_ids.json").read_text()))


def slices_from_arrays(
    volume01: np.ndarray,
    labels: np.ndarray,
    axis: int,
    size: int,
    context: str,
    case_id: str,
    empty_fraction: float = 0.1,
    rng: np.random.Generator | None = None,
    indices: Sequence[int] | None = None,
    affine: np.ndarray | None = None,
) -> LabeledSlices:
    """Labelled slices (and a share of empty body slices) of one volume, letterboxed for the model (oriented by
    the volume's voxel-to-RAS `affine`; identity when not given)."""
    rng = rng or np.random.default_rng(0)
    depth = volume01.shape[axis]
    candidates = list(range(depth)) if indices is None else list(indices)
    chosen = []
    for i in candidates:
        if np.take(labels, i, axis=axis).any():
            chosen.append(i)
        elif (np.take(volume01, i, axis=axis) > 0.05).mean() > 0.05 and rng.random() < empty_fraction:
            chosen.append(i)
    if not chosen:
        return LabeledSlices(np.zeros((0, 3, size, size), np.float16), np.zeros((0, size, size), np.uint8), [])
    images = torch.as_tensor(np.stack([slice_stack(volume01, axis, i, context) for i in chosen]))
    masks = torch.as_tensor(np.stack([np.take(labels, i, axis=axis) for i in chosen]).astype(np.int64))
    letterbox = Letterbox.for_volume(affine, volume01.shape, axis, size)
    return LabeledSlices(
        letterbox.image(images).clamp(0, 1).numpy().astype(np.float16),
        letterbox.label(masks).numpy().astype(np.uint8),
        [case_id] * len(chosen),
    )


def load_labeled_cases(
    cases: Sequence[tuple[str, str, str]],
    size: int,
    context: str = "single",
    label_map: Callable[[np.ndarray, str], np.ndarray] | None = None,
    window: IntensityWindow | None = None,
    empty_fraction: float = 0.1,
    seed: int = 0,
) -> LabeledSlices:
    """Read (case_id, image_path, label_path) triples one at a time into training slices."""
    rng = np.random.default_rng(seed)
    parts = []
    for case_id, image_path, label_path in cases:
        volume = load_volume(image_path)
        labels, _ = load_label(label_path, like=volume)
        if label_map is not None:
            labels = label_map(labels, case_id)
        scaled = normalise(volume.array, window or IntensityWindow.default_for(volume.modality))
        parts.append(
            slices_from_arrays(
                scaled, labels, volume.axial_axis, size, context, case_id, empty_fraction, rng, affine=volume.affine
            )
        )
    return concat_slices(parts, size)


def concat_slices(parts: Sequence[LabeledSlices], size: int) -> LabeledSlices:
    """Join several LabeledSlices."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return LabeledSlices(np.zeros((0, 3, size, size), np.float16), np.zeros((0, size, size), np.uint8), [])
    return LabeledSlices(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        [c for p in parts for c in p.case_ids],
    )


def hold_out_last_study(slices: LabeledSlices, study_ids: Sequence[str]) -> tuple[LabeledSlices, LabeledSlices | None]:
    """(training slices, validation slices or None): with few labelled studies every one trains; from
    MIN_STUDIES_FOR_HOLDOUT on, the last of `study_ids` is held out for best-epoch selection."""
    if len(study_ids) < MIN_STUDIES_FOR_HOLDOUT:
        return slices, None
    held_out = study_ids[-1]
    keep = [i for i, c in enumerate(slices.case_ids) if c != held_out]
    val = slices.subset([i for i, c in enumerate(slices.case_ids) if c == held_out])
    return slices.subset(keep), val

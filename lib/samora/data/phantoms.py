"""Synthetic abdominal CT phantoms with organ labels: the project's own demo and test data (no third-party scans).

Geometry is RAS: voxel axis 0 runs to the patient's right, 1 anterior, 2 superior, so the liver sits at high x,
the spleen at low x, kidneys and spine at low y (posterior). Each seed moves, scales, rotates and deforms the organs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from samora.data.volumes import encode_nifti
from samora.io_utils import atomic_write

__all__ = ["PHANTOM_LABELS", "make_phantom", "write_phantom_studies"]

PHANTOM_LABELS: dict[str, int] = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "spine": 5}

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 50.0
SOFT_TISSUE_HU = 40.0


@dataclass(frozen=True)
class _Organ:
    """An organ as a deformed ellipsoid in body-relative units (x, y: body semi-axes; z: half the z extent)."""

    name: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float


# Mean anatomy; the liver is big and on the right, the right kidney sits a little lower than the left.
_ORGANS = (
    _Organ("liver", (0.38, 0.10, 0.35), (0.48, 0.62, 0.62), 60.0),
    _Organ("spleen", (-0.50, -0.12, 0.38), (0.19, 0.32, 0.36), 50.0),
    _Organ("kidney_left", (-0.38, -0.40, -0.10), (0.18, 0.23, 0.45), 150.0),
    _Organ("kidney_right", (0.38, -0.40, -0.25), (0.18, 0.23, 0.45), 150.0),
)


def make_phantom(
    seed: int, shape: tuple[int, int, int] = (96, 96, 48), spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic abdominal CT: (int16 HU image (X, Y, Z), int16 labels, 4x4 RAS affine); deterministic per seed."""
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3D with every side >= 8, got {shape}")
    rng = np.random.default_rng(seed)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * spacing_arr

    # world coordinates in mm relative to the volume centre, built as broadcastable 1D grids (cheap on memory)
    axes_mm = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing_arr, strict=True)]
    x, y, z = np.meshgrid(*axes_mm, indexing="ij", sparse=True)

    # body: an elliptic cylinder filling most of the axial field of view, slightly off-centre per seed
    body_a = extent[0] * 0.44 * rng.uniform(0.93, 1.05)
    body_b = extent[1] * 0.34 * rng.uniform(0.93, 1.05)
    half_z = extent[2] / 2.0
    body_cx, body_cy = rng.uniform(-0.03, 0.03) * extent[0], rng.uniform(-0.03, 0.03) * extent[1]
    bx, by = x - body_cx, y - body_cy
    radius = np.sqrt((bx / body_a) ** 2 + (by / body_b) ** 2) + 0.03 * _smooth_field(rng, shape)
    body = radius <= 1.0
    interior = radius <= 0.84

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body] = FAT_HU
    image[(radius <= 0.92) & body] = MUSCLE_HU
    image[interior] = SOFT_TISSUE_HU
    labels = np.zeros(shape, dtype=np.int16)

    # mesenteric fat and bowel gas pockets give the unlabeled background some texture; organs paint over them
    for hu, count, size_mm in ((FAT_HU + 10.0, 8, (8.0, 18.0)), (-800.0, 3, (4.0, 9.0))):
        for _ in range(count):
            center = rng.uniform([-0.6, -0.3, -1.0], [0.6, 0.6, 1.0]) * np.array([body_a, body_b, half_z])
            r = rng.uniform(*size_mm)
            blob = (bx - center[0]) ** 2 + (by - center[1]) ** 2 + ((z - center[2]) / 1.5) ** 2 <= r * r
            image[blob & interior] = hu

    # organs painted in order; later ones win overlaps (kidneys over liver, spine over everything)
    for organ in _ORGANS:
        mask = _organ_mask(rng, organ, bx, by, z, (body_a, body_b, half_z), shape) & interior
        hu = organ.hu + rng.uniform(-4.0, 4.0)
        image[mask] = hu
        labels[mask] = PHANTOM_LABELS[organ.name]

    spine_mask, spine_hu = _spine(rng, bx, by, z, (body_a, body_b), shape)
    image[spine_mask] = spine_hu[spine_mask]
    labels[spine_mask] = PHANTOM_LABELS["spine"]

    # partial-volume blur at organ edges, a smooth scanner bias inside the body, then quantum noise everywhere
    image = ndimage.gaussian_filter(image, sigma=0.5, mode="nearest")
    image += np.where(body, 8.0 * _smooth_field(rng, shape), 0.0).astype(np.float32)
    image += rng.normal(0.0, rng.uniform(10.0, 15.0), size=shape).astype(np.float32)
    image_hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    affine = np.diag([*spacing_arr, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * spacing_arr  # centre of the volume at world origin
    return image_hu, labels, affine


def write_phantom_studies(
    out_dir: str | os.PathLike,
    n_labeled: int = 3,
    n_unlabeled: int = 3,
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 48),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    truth_dir: str | os.PathLike | None = None,
) -> dict:
    """Write phantoms as a MONAI Label local datastore (images flat, labels/final/<id>.nii.gz) and return the ids.

    The unlabeled studies' ground truth goes to `truth_dir` (if given), outside the datastore, so evaluation can
    score them without the app ever seeing the labels.
    """
    if n_labeled < 0 or n_unlabeled < 0:
        raise ValueError("n_labeled and n_unlabeled must be >= 0")
    out_dir = Path(out_dir)
    labeled: list[str] = []
    unlabeled: list[str] = []
    for i in range(n_labeled + n_unlabeled):
        study_id = f"phantom_{i:03d}"
        image, labels, affine = make_phantom(seed + i, shape=shape, spacing=spacing)
        _write_if_changed(out_dir / f"{study_id}.nii.gz", encode_nifti(image, affine))
        label_bytes = encode_nifti(labels.astype(np.uint8), affine)
        if i < n_labeled:
            labeled.append(study_id)
            _write_if_changed(out_dir / "labels" / "final" / f"{study_id}.nii.gz", label_bytes)
        else:
            unlabeled.append(study_id)
            if truth_dir is not None:
                _write_if_changed(Path(truth_dir) / f"{study_id}.nii.gz", label_bytes)
    return {"labeled": labeled, "unlabeled": unlabeled, "labels": dict(PHANTOM_LABELS)}


# ----------------------------------------------------------------------------------------------------------------
# internals


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], grid: int = 5) -> np.ndarray:
    """Low-frequency random field in about [-1, 1]: cubic upsampling of a coarse random grid."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid, max(3, grid // 2 + 1)))
    zoom = [n / c for n, c in zip(shape, coarse.shape, strict=True)]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    # zoom may land one voxel off the requested size on odd ratios: pad/crop to the exact shape
    field = field[: shape[0], : shape[1], : shape[2]]
    pad = [(0, n - f) for n, f in zip(shape, field.shape, strict=True)]
    return np.pad(field, pad, mode="edge").astype(np.float32)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Random rotation: up to 20 degrees about the superior axis, up to 8 degrees of tilt."""
    yaw, pitch = np.deg2rad(rng.uniform(-20, 20)), np.deg2rad(rng.uniform(-8, 8))
    rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    return rz @ rx


def _organ_mask(
    rng: np.random.Generator,
    organ: _Organ,
    bx: np.ndarray,
    by: np.ndarray,
    z: np.ndarray,
    scale: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """A randomly placed, scaled, rotated ellipsoid whose surface is bumped by a smooth random field."""
    scale_arr = np.asarray(scale)
    center = (np.asarray(organ.center) + rng.uniform(-0.06, 0.06, size=3)) * scale_arr
    radii = np.asarray(organ.radii) * rng.uniform(0.85, 1.15, size=3) * scale_arr
    rot = _rotation(rng)
    # coordinates in the organ's own frame: p' = R^T (p - c), then scaled by the radii
    dx, dy, dz = bx - center[0], by - center[1], z - center[2]
    u = (rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz) / radii[0]
    v = (rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz) / radii[1]
    w = (rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz) / radii[2]
    distance = np.sqrt(u**2 + v**2 + w**2)
    return distance + 0.15 * _smooth_field(rng, shape) <= 1.0


def _spine(
    rng: np.random.Generator,
    bx: np.ndarray,
    by: np.ndarray,
    z: np.ndarray,
    scale: tuple[float, float],
    shape: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior midline bone cylinder with a dense cortical shell (~700 HU) around cancellous bone (~450 HU)."""
    body_a, body_b = scale
    cx = rng.uniform(-0.04, 0.04) * body_a
    cy = rng.uniform(-0.72, -0.64) * body_b
    radius = rng.uniform(0.13, 0.16) * body_b
    # a gentle lordotic curve: the centre drifts in y along z
    drift = rng.uniform(-0.05, 0.05) * body_b * np.sin(np.pi * z / (np.max(np.abs(z)) + 1e-6))
    r = np.sqrt((bx - cx) ** 2 + (by - cy - drift) ** 2) / radius
    mask = np.broadcast_to(r <= 1.0, shape)
    cancellous = rng.uniform(380.0, 480.0)
    hu = np.broadcast_to(np.where(r > 0.75, 700.0, cancellous), shape).astype(np.float32)
    return mask, hu


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write, skipped when the file already holds exactly these bytes (re-running the demo is cheap)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    atomic_write(path, write)

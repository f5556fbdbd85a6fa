"""Where the pixels of a single-frame DICOM image series lie on a volume's voxel grid (voxel -> RAS affine).

A label volume and the DICOM frames it is written into (or read from) must describe the same voxels; this module is
the one place that maps between them, and it refuses a series whose pixels do not fall on the volume's voxel centres.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from samora.data.volumes import DICOM_GEOMETRY_TAGS

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
TOLERANCE_VOXELS = 0.05  # header values are rounded decimals: a few hundredths of a voxel is the same centre


class GridMismatch(ValueError):
    """A DICOM series and a volume do not describe the same voxels; the message says how they differ."""


def read_series_headers(folder: str | os.PathLike) -> list[Dataset]:
    """Headers (no pixels) of the one image series in `folder`, ordered along the slice normal."""
    headers = []
    for child in sorted(Path(folder).iterdir()):
        if child.is_file() and not child.name.startswith("."):
            headers.append(pydicom.dcmread(child, stop_before_pixels=True, force=True))
    if not headers:
        raise GridMismatch(f"{folder}: no DICOM files")
    for header in headers:
        missing = [tag for tag in DICOM_GEOMETRY_TAGS if tag not in header]
        if missing:
            raise GridMismatch(f"{folder}: instance {header.get('SOPInstanceUID', '?')} lacks {missing}")
    normal = np.cross(*np.reshape(np.asarray(headers[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(headers, key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, float))))


def slice_spacing(headers: list[Dataset]) -> float | None:
    """Distance between consecutive frames along the normal (None for one frame); may differ from SliceThickness."""
    if len(headers) < 2:
        return None
    normal = np.cross(*np.reshape(np.asarray(headers[0].ImageOrientationPatient, float), (2, 3)))
    positions = [float(np.dot(normal, np.asarray(h.ImagePositionPatient, float))) for h in headers]
    return float(np.median(np.diff(positions)))


def frame_voxel_indices(header: Dataset, affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Voxel indices (i, j, k arrays of the frame's rows x columns) of every pixel of one DICOM frame."""
    rows, cols = int(header.Rows), int(header.Columns)
    orientation = np.asarray(header.ImageOrientationPatient, float)
    along_row, along_col = orientation[:3], orientation[3:]  # direction of increasing column, of increasing row
    row_spacing, col_spacing = (float(v) for v in header.PixelSpacing)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = (
        np.asarray(header.ImagePositionPatient, float)[:, None, None]
        + along_row[:, None, None] * (c * col_spacing)[None]
        + along_col[:, None, None] * (r * row_spacing)[None]
    )
    ras = np.tensordot(LPS_TO_RAS, lps, axes=1)
    inverse = np.linalg.inv(affine)
    voxel = np.tensordot(inverse[:3, :3], ras, axes=1) + inverse[:3, 3][:, None, None]
    nearest = np.rint(voxel)
    off = float(np.abs(voxel - nearest).max())
    if off > TOLERANCE_VOXELS:
        raise GridMismatch(
            f"instance {header.SOPInstanceUID}: its pixels lie {off:.2f} voxel off the volume's voxel centres"
        )
    index = nearest.astype(int)
    for axis, size in enumerate(shape[:3]):
        if index[axis].min() < 0 or index[axis].max() >= size:
            raise GridMismatch(f"instance {header.SOPInstanceUID}: its pixels fall outside the volume {shape}")
    return tuple(index)


def volume_to_frames(volume: np.ndarray, affine: np.ndarray, headers: list[Dataset]) -> np.ndarray:
    """The volume's values at every pixel of the series, as (frames, rows, columns) in the headers' order."""
    check_slice_count(volume.shape, headers)
    return np.stack([volume[frame_voxel_indices(h, affine, volume.shape)] for h in headers])


def frames_to_volume(frames: np.ndarray, affine: np.ndarray, headers: list[Dataset], shape: tuple[int, ...]):
    """The inverse of volume_to_frames: the frames placed on the volume's grid."""
    check_slice_count(shape, headers)
    volume = np.zeros(shape, dtype=frames.dtype)
    for frame, header in zip(frames, headers, strict=True):
        volume[frame_voxel_indices(header, affine, shape)] = frame
    return volume


def check_slice_count(shape: tuple[int, ...], headers: list[Dataset]) -> None:
    """The series covers the volume exactly: as many pixels as voxels (each pixel on its own voxel)."""
    pixels = sum(int(h.Rows) * int(h.Columns) for h in headers)
    if pixels != int(np.prod(shape[:3])):
        raise GridMismatch(f"the series has {len(headers)} frames ({pixels} pixels) for a volume of shape {shape}")

"""A label volume as an NRRD laid out frame by frame like its DICOM series, for web viewers of that series.

OHIF's MONAI Label panel copies the result's raw bytes straight into its labelmap, ignoring the NRRD's geometry:
the bytes must be uint8 in the order the viewer holds the CT (columns fastest, then rows, then frames sorted along
the slice normal). The header still carries the true LPS geometry, so other NRRD readers place it correctly.
"""

from __future__ import annotations

import os

import nrrd
import numpy as np
from pydicom.dataset import Dataset

from samora.data.dicom_grid import slice_spacing, volume_to_frames


def write_series_nrrd(
    labels: np.ndarray, affine: np.ndarray, headers: list[Dataset], path: str | os.PathLike, compress: bool = False
) -> str:
    """Write `labels` (on the grid `affine` maps) as uint8 frames of the series `headers` (ordered along the normal,
    as read_series_headers returns them), raw or gzip-compressed; returns the path."""
    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"label values {values.min()}..{values.max()} do not fit the viewer's uint8 labelmap")
    frames = volume_to_frames(values.astype(np.int64), affine, headers).astype(np.uint8)  # (frames, rows, cols)
    first = headers[0]
    along_row, along_col = np.reshape(np.asarray(first.ImageOrientationPatient, float), (2, 3))
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    step = slice_spacing(headers) or float(first.get("SliceThickness") or 1.0)
    header = {
        "type": "uint8",
        "space": "left-posterior-superior",
        # NRRD axis order is fastest first: columns, rows, frames
        "space directions": np.stack(
            [along_row * col_spacing, along_col * row_spacing, np.cross(along_row, along_col) * step]
        ),
        "space origin": np.asarray(first.ImagePositionPatient, float),
        "kinds": ["domain", "domain", "domain"],
        # nrrd.js in OHIF views inflated gzip data as 16-bit words, which needs an even byte count
        "encoding": "gzip" if compress and frames.size % 2 == 0 else "raw",
    }
    nrrd.write(str(path), frames, header, index_order="C")
    return str(path)

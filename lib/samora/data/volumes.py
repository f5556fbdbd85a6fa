"""Read and write 3D medical volumes (NIfTI, NRRD, DICOM series) with a voxel->RAS affine and sanity checks.

Arrays keep the voxel order of the file; only the affine says where the voxels are. Every format goes through a
MONAI reader configured so that the affine is voxel->RAS world (NIfTI convention), which makes a NIfTI and the
equivalent DICOM series agree voxel for voxel.
"""

from __future__ import annotations

import gzip
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samora.io_utils import atomic_write

__all__ = [
    "Volume",
    "VolumeError",
    "VolumeTooLarge",
    "axial_axis_of",
    "is_dicom_dir",
    "load_label",
    "load_volume",
    "save_image",
    "save_label",
    "set_max_voxels",
    "volume_suffix",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
MODALITIES = ("CT", "MR")
MAX_SPACING_MM = 50.0
AFFINE_TOLERANCE = 1e-3
# without these a slice's place and size are unknown, and ITK silently falls back to 1 mm spacing and file order
DICOM_GEOMETRY_TAGS = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
_max_voxels = 0  # process-wide memory budget (the app's conf max_voxels); 0 = no limit

# gzip level of written NIfTI: a label map compresses ~60x at level 1 and the answer is written and read several
# times faster than at 6 (bench/label_format.py, docs/benchmarks.md section 4.3)
GZIP_LEVEL = 1


class VolumeError(ValueError):
    """A file that cannot be used as a 3D volume or label; the message names the file and the problem."""


class VolumeTooLarge(VolumeError):
    """A volume whose header promises more voxels than the memory budget allows (refused before reading voxels)."""


def set_max_voxels(limit: int) -> None:
    """Refuse, from the header, volumes and labels of more than `limit` voxels (0 = no limit) in this process."""
    global _max_voxels
    _max_voxels = max(0, int(limit))


@dataclass
class Volume:
    """A 3D scalar volume: float32 voxels in file order, a 4x4 voxel->RAS affine, its source path and modality."""

    array: np.ndarray
    affine: np.ndarray
    path: str
    modality: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each voxel axis (affine column norms)."""
        return _spacing(self.affine)

    @property
    def axial_axis(self) -> int:
        """Voxel axis that runs closest to superior-inferior: slicing across it gives axial slices."""
        return axial_axis_of(self.affine)


def axial_axis_of(affine: np.ndarray) -> int:
    """Index of the voxel axis whose world direction has the largest |z| (superior) component."""
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(directions, axis=0)
    norms[norms == 0] = 1.0
    # argmax keeps the first axis on exact ties, so the choice is deterministic for obliques at 45 degrees
    return int(np.argmax(np.abs(directions[2] / norms)))


def volume_suffix(path: str | os.PathLike) -> str:
    """The format suffix of a path (".nii.gz", ".nii", ".nrrd", ".nhdr"), lower case, or "" if not a known one."""
    name = Path(path).name.lower()
    for suffix in (*NIFTI_SUFFIXES, *NRRD_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return ""


def is_dicom_dir(path: str | os.PathLike) -> bool:
    """True if a directory directly holds at least one DICOM file (by .dcm suffix or the DICM preamble)."""
    path = Path(path)
    if not path.is_dir():
        return False
    for child in sorted(path.iterdir()):
        if child.is_file() and not child.name.startswith(".") and _looks_like_dicom(child):
            return True
    return False


def load_volume(path: str | os.PathLike, modality: str | None = None, check: bool = True) -> Volume:
    """Load a NIfTI/NRRD file or a one-series DICOM directory as a validated float32 3D Volume."""
    path = Path(path)
    dicom_modality, n_files = _check_size(path)
    array, affine = _read(path)
    _check_slice_count(array, n_files, path)
    array = _as_3d(array, path)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if check:
        _check_affine(affine, path)
        _check_values(array, path)
    if modality is not None:
        modality = modality.upper()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    elif dicom_modality in MODALITIES:
        modality = dicom_modality
    else:
        # DICOM with an unusual tag (e.g. "OT" for secondary captures) falls back to the intensity heuristic
        modality = guess_modality(array)
    return Volume(array=array, affine=affine, path=str(path), modality=modality)


def guess_modality(array: np.ndarray) -> str:
    """Guess "CT" (Hounsfield-like: integer values, air below -500, range over 1000) or else "MR"."""
    sample = _sample(array)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return "MR"
    low, high = float(finite.min()), float(finite.max())
    integer_like = np.mean(np.abs(finite - np.round(finite)) < 1e-3) > 0.99
    return "CT" if low < -500 and high - low > 1000 and integer_like else "MR"


def load_label(path: str | os.PathLike, like: Volume | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load an integer label map as (int16 array, voxel->RAS affine), optionally checked against a Volume's grid."""
    path = Path(path)
    _, n_files = _check_size(path)
    array, affine = _read(path)
    _check_slice_count(array, n_files, path)
    array = _as_3d(array, path)
    _check_affine(affine, path)
    if not np.all(np.isfinite(array)):
        raise VolumeError(f"{path}: label map contains NaN/Inf values")
    rounded = np.rint(array)
    if np.any(np.abs(array - rounded) > 1e-3):
        raise VolumeError(f"{path}: label map has non-integer values (is this an image rather than a label?)")
    if rounded.size and (rounded.min() < np.iinfo(np.int16).min or rounded.max() > np.iinfo(np.int16).max):
        raise VolumeError(f"{path}: label values {rounded.min():.0f}..{rounded.max():.0f} do not fit int16")
    labels = rounded.astype(np.int16)
    if like is not None:
        if labels.shape != like.shape:
            raise VolumeError(f"label {path} has shape {labels.shape} but image {like.path} has shape {like.shape}")
        diff = float(np.max(np.abs(affine - like.affine)))
        if diff > AFFINE_TOLERANCE:
            raise VolumeError(
                f"label {path} affine differs from image {like.path} affine by {diff:.4g} (> {AFFINE_TOLERANCE}):\n"
                f"label:\n{np.round(affine, 4)}\nimage:\n{np.round(like.affine, 4)}"
            )
    return labels, affine


def save_label(labels: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an integer label map atomically as NIfTI (.nii/.nii.gz) or NRRD (.nrrd), uint8 when it fits else int16."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.rint(labels)):
            raise ValueError("labels must be integer-valued")
    if labels.size and (labels.min() < np.iinfo(np.int16).min or labels.max() > np.iinfo(np.int16).max):
        raise ValueError(f"label values {labels.min()}..{labels.max()} do not fit int16")
    fits_uint8 = labels.size == 0 or (labels.min() >= 0 and labels.max() <= 255)
    return _save(labels.astype(np.uint8 if fits_uint8 else np.int16), affine, path)


def save_image(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 3D image atomically as NIfTI or NRRD, keeping its dtype (e.g. int16 HU)."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {array.shape}")
    return _save(array, affine, path)


def encode_nifti(array: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """Serialise an array + RAS affine to NIfTI-1 bytes (gzip with a fixed mtime, so equal data gives equal bytes).
    NIfTI is Fortran-ordered: a C-ordered array is transposed first, costlier than the gzip (bench/label_format.py)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    # code 1 (scanner) on both forms so every reader (ITK, nibabel, Slicer) agrees on the geometry
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0) if compress else raw


# ----------------------------------------------------------------------------------------------------------------
# internals


def _save(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        data = encode_nifti(array, affine, compress=suffix == ".nii.gz")

        def write(tmp: str) -> None:
            Path(tmp).write_bytes(data)

    elif suffix == ".nrrd":

        def write(tmp: str) -> None:
            _write_nrrd(tmp, array, affine)

    else:
        raise ValueError(f"{path}: unsupported output format (use .nii.gz, .nii or .nrrd)")
    return atomic_write(path, write)


def _write_nrrd(filename: str, array: np.ndarray, affine: np.ndarray) -> None:
    import nrrd

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # NRRD is conventionally written in LPS, like DICOM
    header = {
        "type": array.dtype.name,
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,  # one row per voxel axis
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    # index_order "F" maps array[i, j, k] to NRRD axes 0, 1, 2, matching how the readers give the array back
    nrrd.write(filename, np.asarray(array), header, index_order="F")


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read voxels (file order) and a voxel->RAS affine with a MONAI reader; any failure becomes a VolumeError."""
    if not path.exists():
        raise VolumeError(f"{path}: no such file or directory")
    suffix = volume_suffix(path)
    if not path.is_dir() and suffix == "":
        raise VolumeError(f"{path}: unsupported format (expected .nii, .nii.gz, .nrrd, .nhdr or a DICOM directory)")
    try:
        # imported here: monai takes seconds to import and most users of samora.data only need numpy helpers
        from monai.data.image_reader import ITKReader, NibabelReader

        if suffix in NIFTI_SUFFIXES:
            reader: Any = NibabelReader(squeeze_non_spatial_dims=False)
        else:
            # ITK for NRRD (any "space", detached headers) and DICOM (GDCM sorts slices along the normal); with
            # reverse_indexing off the array is (x, y, z) like nibabel, and the LPS affine is flipped to RAS
            reader = ITKReader(reverse_indexing=False, affine_lps_to_ras=True)
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            # MONAI's reader silently rebuilds a broken affine from pixdim, so look at the raw header first:
            # a non-finite sform/qform means a broken writer and the geometry cannot be trusted
            raw_affine = nib.load(str(path)).affine  # header only, the voxels stay on disk
            if not np.all(np.isfinite(raw_affine)):
                raise VolumeError(f"{path}: affine in the NIfTI header contains NaN/Inf:\n{raw_affine}")
        image = reader.read(str(path))
        array, meta = reader.get_data(image)
    except VolumeError:
        raise
    except Exception as exc:  # readers raise anything from EOFError to RuntimeError on corrupt input
        raise VolumeError(f"{path}: unreadable or corrupt file ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(meta.get("affine"), dtype=np.float64)
    if affine.shape != (4, 4):
        raise VolumeError(f"{path}: reader returned no 4x4 affine (got shape {affine.shape})")
    return np.asarray(array), affine


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton dims beyond 3 (a 4D file with one frame is a 3D volume); reject everything else."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3:
        return array
    if array.ndim < 3:
        raise VolumeError(f"{path}: expected a 3D volume, got a {array.ndim}D image of shape {array.shape}")
    channels = int(np.prod(array.shape[3:]))
    raise VolumeError(
        f"{path}: expected a 3D volume, got a {array.ndim}D image of shape {array.shape} "
        f"({channels} channels/time points); split it into 3D volumes first"
    )


def _check_size(path: Path) -> tuple[str | None, int]:
    """Check the header's voxel count against the budget before any voxel is read; (DICOM modality, file count)."""
    modality, n_files, shape = None, 0, None
    if path.is_dir():
        modality, n_files, shape = _scan_dicom_series(path)
    elif _max_voxels:
        shape = _header_shape(path)
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if _max_voxels and voxels > _max_voxels:
        raise VolumeTooLarge(
            f"{path}: volume of {' x '.join(map(str, shape))} = {voxels:,} voxels ({voxels * 4 / 2**20:,.0f} MiB as "
            f"float32) is over this server's limit of {_max_voxels:,} voxels (max_voxels)"
        )
    return modality, n_files


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """Voxel grid from a NIfTI/NRRD header alone; None when the header is unreadable (_read then says why)."""
    try:
        if volume_suffix(path) in NIFTI_SUFFIXES:
            import nibabel as nib

            return tuple(nib.load(str(path)).shape)
        if volume_suffix(path) in NRRD_SUFFIXES:
            import nrrd

            return tuple(int(s) for s in nrrd.read_header(str(path))["sizes"])
    except Exception:  # corrupt headers are reported by _read with the reader's own message
        return None
    return None


def _check_slice_count(array: np.ndarray, n_files: int, path: Path) -> None:
    """A single-frame series must give one slice per file: ITK silently skips files it cannot read."""
    if n_files > 1 and array.ndim == 3 and array.shape[2] != n_files:
        raise VolumeError(
            f"{path}: the series has {n_files} DICOM files but only {array.shape[2]} slices could be read "
            "(files without pixel data?)"
        )


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def _check_affine(affine: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(affine)):
        raise VolumeError(f"{path}: affine contains NaN/Inf:\n{affine}")
    spacing = _spacing(affine)
    if any(s <= 1e-6 or s > MAX_SPACING_MM for s in spacing):
        raise VolumeError(f"{path}: implausible voxel spacing {spacing} mm (must be in (0, {MAX_SPACING_MM}])")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: affine is singular (voxel axes are not independent):\n{affine}")


def _check_values(array: np.ndarray, path: Path) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        raise VolumeError(f"{path}: {int(finite.size - finite.sum())} voxels are NaN/Inf")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise VolumeError(f"{path}: all voxels have the same value {low:g} (empty or blank volume)")


def _sample(array: np.ndarray, max_voxels: int = 1_000_000) -> np.ndarray:
    """A deterministic strided sample, so statistics on large volumes stay cheap."""
    flat = array.reshape(-1)
    step = max(1, flat.size // max_voxels)
    return flat[::step]


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _scan_dicom_series(path: Path) -> tuple[str | None, int, tuple[int, int, int]]:
    """Check a directory holds one complete single-frame DICOM series; (Modality tag, file count, voxel grid)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[str]] = defaultdict(list)
    modalities: dict[str, str] = {}
    headers = []
    for child in sorted(path.iterdir()):
        if not child.is_file() or child.name.startswith("."):
            continue
        try:
            header = pydicom.dcmread(child, stop_before_pixels=True, force=child.suffix.lower() == ".dcm")
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # non-DICOM files (README, DICOMDIR without preamble...) are not part of the series
        uid = str(getattr(header, "SeriesInstanceUID", "") or "")
        if not uid:
            if child.suffix.lower() == ".dcm":
                raise VolumeError(f"{path}: {child.name} has no SeriesInstanceUID (corrupt DICOM?)")
            continue
        series[uid].append(child.name)
        modalities.setdefault(uid, str(getattr(header, "Modality", "") or "").upper())
        headers.append((child.name, header))
    if not series:
        raise VolumeError(f"{path}: directory holds no readable DICOM files")
    if len(series) > 1:
        listing = "; ".join(f"{uid} ({len(files)} files)" for uid, files in sorted(series.items()))
        raise VolumeError(f"{path}: holds {len(series)} DICOM series, expected one: {listing}")
    frames = int(headers[0][1].get("NumberOfFrames", 1) or 1)
    if len(headers) == 1 and frames > 1:
        h = headers[0][1]
        return next(iter(modalities.values())), 1, (int(h.Columns), int(h.Rows), frames)  # one multi-frame file
    _check_dicom_geometry(path, headers)
    h = headers[0][1]
    return next(iter(modalities.values())), len(headers), (int(h.Columns), int(h.Rows), len(headers))


def _check_dicom_geometry(path: Path, headers: list) -> None:
    """Every slice names its size, place and orientation; one grid; evenly spaced positions (no missing slices)."""
    for name, h in headers:
        missing = [tag for tag in DICOM_GEOMETRY_TAGS if tag not in h]
        if missing:
            raise VolumeError(f"{path}: {name} lacks the DICOM tags {missing}: the volume's geometry is unknown")
    grids = {(int(h.Rows), int(h.Columns)) for _, h in headers}
    if len(grids) > 1:
        raise VolumeError(f"{path}: slices of different sizes {sorted(grids)} (rows, columns) in one series")
    if len(headers) < 3:
        return
    orient = np.asarray(headers[0][1].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orient[:3], orient[3:])
    depth = np.sort([float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=np.float64))) for _, h in headers])
    gaps = np.diff(depth)
    if gaps.min() < 1e-3 or gaps.max() > 1.5 * np.median(gaps):
        raise VolumeError(
            f"{path}: slice positions are not evenly spaced (gaps {gaps.min():.3g}..{gaps.max():.3g} mm): "
            "duplicate or missing slices"
        )

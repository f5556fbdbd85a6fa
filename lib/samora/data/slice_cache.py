"""An on-disk cache of preprocessed 2D slices so self-supervised pretraining streams from memmaps, not RAM.

`SliceCache.build` reads one study at a time, keeps its informative axial slices (resized, quantised to uint8)
in a per-study .npy file, and writes `index.json` last; a later build with the same inputs and settings finds the
matching `data_hash` and reuses the files without reading a single study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from samora.data.intensity import IntensityWindow, default_for, normalise
from samora.data.slices import CONTEXTS, Letterbox, informative_slices, iter_slice_batches
from samora.data.volumes import VolumeError, is_dicom_dir, load_volume, volume_suffix
from samora.io_utils import atomic_write_json

__all__ = ["SliceCache", "SliceDataset", "discover_studies"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
CACHE_FORMAT = 2  # 2: slices letterboxed (aspect kept, zero padding) instead of squashed
_SLICE_FILE = "slices_{:05d}.npy"
# Stems that mark a segmentation rather than an image (label.nii.gz, liver_seg.nrrd, x.seg.nrrd, ..._mask.nii.gz).
_LABEL_MARKERS = ("_seg", "_label", "_labels", "_mask", ".seg")


def discover_studies(folder: str | os.PathLike) -> list[Path]:
    """Image files and DICOM series directories in `folder` or one level below, sorted; label files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    found: list[Path] = []
    for entry in _visible_children(folder):
        if entry.is_file():
            if _is_image_file(entry):
                found.append(entry)
        elif entry.is_dir() and entry.name.lower() != "labels":
            if is_dicom_dir(entry):
                found.append(entry)
                continue
            for child in _visible_children(entry):
                if child.is_file() and _is_image_file(child):
                    found.append(child)
                elif child.is_dir() and child.name.lower() != "labels" and is_dicom_dir(child):
                    found.append(child)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class SliceCache:
    """Preprocessed (3, size, size) slices of many studies, backed by read-only per-study memmaps."""

    def __init__(self, cache_dir: str | os.PathLike, index: dict[str, Any]) -> None:
        self.cache_dir = Path(cache_dir)
        self.index = index
        self._arrays: list[np.memmap] | None = None
        counts = [len(s["slices"]) for s in index["studies"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        studies: Sequence[str | os.PathLike],
        cache_dir: str | os.PathLike,
        size: int,
        context: str = "single",
        window: IntensityWindow | None = None,
        progress: bool = True,
        min_foreground: float = 0.05,
        batch_size: int = 16,
    ) -> SliceCache:
        """Preprocess studies one at a time into `cache_dir`, or reuse it if inputs and settings are unchanged."""
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        cache_dir = Path(cache_dir)
        paths = [Path(p) for p in studies]
        settings = {
            "format": CACHE_FORMAT,
            "size": int(size),
            "context": context,
            # without an explicit window the CT default (conf ct_window, process-wide) shapes the slices
            "window": window.to_dict() if window is not None else {"default_ct": default_for("CT").to_dict()},
            "min_foreground": float(min_foreground),
        }
        data_hash = _data_hash(paths, settings)
        cache = cls._up_to_date(cache_dir, data_hash)
        if cache is not None:
            return cache
        cache_dir.mkdir(parents=True, exist_ok=True)
        ids = _study_ids(paths)
        records: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        for number, path in enumerate(_progress(paths, progress)):
            slice_file = cache_dir / _SLICE_FILE.format(number)
            try:
                record = _cache_study(
                    path, ids[number], slice_file, size, context, window, min_foreground, batch_size
                )  # fmt: skip
            except VolumeError as exc:
                # one bad study must not stop pretraining on the others; the index says why it is missing
                logger.warning("skipping study %s: %s", path, exc)
                skipped[str(path)] = str(exc)
                continue
            records.append(record)
        index = {**settings, "data_hash": data_hash, "studies": records, "skipped": skipped}
        atomic_write_json(cache_dir / INDEX_FILE, index)
        keep = {r["file"] for r in records if r["file"]}
        for stale in cache_dir.glob("slices_*.npy"):
            if stale.name not in keep:
                stale.unlink()
        return cls.open(cache_dir)

    @classmethod
    def _up_to_date(cls, cache_dir: Path, data_hash: str) -> SliceCache | None:
        """The cache in `cache_dir` if it was built from the same inputs and settings and opens; else None."""
        existing = _read_index(cache_dir)
        if existing is None or existing.get("data_hash") != data_hash:
            return None
        try:
            cache = cls.open(cache_dir)
        except (OSError, ValueError) as exc:  # a missing/damaged .npy: rebuild rather than fail
            logger.warning("slice cache %s unusable (%s); rebuilding", cache_dir, exc)
            return None
        logger.info("slice cache %s is up to date (%d slices)", cache_dir, len(cache))
        return cache

    @classmethod
    def open(cls, cache_dir: str | os.PathLike) -> SliceCache:
        """Open an existing cache read-only (memmaps, nothing loaded into RAM)."""
        cache_dir = Path(cache_dir)
        index = _read_index(cache_dir)
        if index is None:
            raise FileNotFoundError(f"{cache_dir}: no {INDEX_FILE}; build the cache first")
        cache = cls(cache_dir, index)
        cache._open_arrays()
        return cache

    # -- access ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        """Slice `i` as (3, size, size) float32 in [0, 1]."""
        study, row = self.locate(i)
        stored = self.arrays[study][row]
        image = stored.astype(np.float32) * np.float32(1.0 / 255.0)
        # "single" stores one channel; repeating at read time costs nothing and cuts the disk footprint by 3
        return np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image

    def locate(self, i: int) -> tuple[int, int]:
        """(study number, row in that study's file) of global slice `i`."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"slice {i} out of range for a cache of {n} slices")
        i = int(i) % n
        study = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return study, i - int(self._offsets[study])

    def slice_info(self, i: int) -> tuple[str, int]:
        """(study id, slice index along the study's axial axis) of global slice `i`."""
        study, row = self.locate(i)
        record = self.index["studies"][study]
        return record["id"], int(record["slices"][row])

    @property
    def arrays(self) -> list[np.memmap]:
        """Per-study read-only memmaps, shape (n_slices, channels, size, size), uint8."""
        if self._arrays is None:
            self._open_arrays()
        assert self._arrays is not None
        return self._arrays

    @property
    def study_ids(self) -> list[str]:
        """Ids of the cached studies (with at least one informative slice or not), in build order."""
        return [s["id"] for s in self.index["studies"]]

    @property
    def data_hash(self) -> str:
        """sha256 over the study files (names, sizes, mtimes) and the preprocessing settings."""
        return str(self.index["data_hash"])

    @property
    def size(self) -> int:
        """Side of the square slices."""
        return int(self.index["size"])

    @property
    def context(self) -> str:
        """ "single" or "2.5d"."""
        return str(self.index["context"])

    def __getstate__(self) -> dict[str, Any]:
        # pickling a memmap copies its whole content; worker processes reopen the files instead
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _open_arrays(self) -> None:
        arrays = []
        channels = 1 if self.context == "single" else 3
        empty = np.zeros((0, channels, self.size, self.size), dtype=np.uint8)
        for record in self.index["studies"]:
            if not record["file"]:
                arrays.append(empty)  # a study without informative slices has no file (mmap cannot be empty)
                continue
            array = np.load(self.cache_dir / record["file"], mmap_mode="r")
            if array.shape[0] != len(record["slices"]):
                raise ValueError(
                    f"{record['file']}: {array.shape[0]} slices on disk, index says {len(record['slices'])}"
                )
            arrays.append(array)
        self._arrays = arrays


class SliceDataset(Dataset):
    """Torch dataset over a SliceCache: float32 tensors (3, S, S) in [0, 1], optionally transformed."""

    def __init__(self, cache: SliceCache, transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.cache = cache
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> Any:
        image = torch.from_numpy(self.cache[i])
        return self.transform(image) if self.transform is not None else image


# ----------------------------------------------------------------------------------------------------------------
# internals


def _visible_children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image_file(path: Path) -> bool:
    suffix = volume_suffix(path)
    if suffix == "":
        return False
    stem = path.name[: -len(suffix)].lower()
    return not stem.startswith("label") and not any(stem.endswith(m) for m in _LABEL_MARKERS)


def _study_files(path: Path) -> list[Path]:
    """The files whose bytes make up a study (a DICOM directory's files, a .nhdr and its data file)."""
    if path.is_dir():
        return [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    files = [path]
    if volume_suffix(path) == ".nhdr":
        stem = path.name[: -len(".nhdr")]
        files += sorted(p for p in path.parent.glob(stem + ".*") if p != path)
    return files


def _data_hash(paths: Sequence[Path], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        digest.update(str(path.resolve()).encode())
        if not path.exists():
            raise FileNotFoundError(f"{path}: study does not exist")
        for f in _study_files(path):
            stat = f.stat()
            digest.update(f"\0{f.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _study_ids(paths: Sequence[Path]) -> list[str]:
    """Readable ids: the file stem (or directory name), prefixed by parent folders only where that is ambiguous."""

    def stem(path: Path) -> str:
        suffix = volume_suffix(path)
        return path.name[: -len(suffix)] if suffix else path.name

    ids = [stem(p) for p in paths]
    for depth in (1, 2):
        counts = {i: ids.count(i) for i in ids}
        ids = [
            "_".join([*p.parts[-1 - depth : -1], stem(p)]) if counts[i] > 1 else i
            for i, p in zip(ids, paths, strict=True)
        ]
    seen: dict[str, int] = {}
    unique = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        unique.append(i if seen[i] == 1 else f"{i}_{seen[i]}")
    return unique


def _cache_study(
    path: Path,
    study_id: str,
    out_file: Path,
    size: int,
    context: str,
    window: IntensityWindow | None,
    min_foreground: float,
    batch_size: int,
) -> dict[str, Any]:
    """Preprocess one study into `out_file`; only this study's volume is in memory while it runs."""
    volume = load_volume(path)
    study_window = window or IntensityWindow.default_for(volume.modality)
    volume01 = normalise(volume.array, study_window)
    axis = volume.axial_axis
    letterbox = Letterbox.for_volume(volume.affine, volume.shape, axis, size)
    del volume
    slices = informative_slices(volume01, axis, min_foreground=min_foreground)
    record: dict[str, Any] = {
        "id": study_id,
        "path": str(path),
        "axis": axis,
        "shape": list(volume01.shape),
        "window": study_window.to_dict(),
        "slices": slices,
        "file": None,
    }
    if not slices:
        return record
    channels = 1 if context == "single" else 3
    tmp = out_file.with_name(f".{out_file.stem}.tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(slices), channels, size, size))
    try:
        row = 0
        for _, batch in iter_slice_batches(volume01, axis, batch_size, context, indices=slices):
            resized = letterbox.image(torch.from_numpy(batch[:, :channels])).numpy()
            # uint8 keeps 1/255 resolution on [0, 1]: plenty for SSL targets, and 4x smaller than float32
            array[row : row + len(batch)] = np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)
            row += len(batch)
        array.flush()
        del array  # close the mapping before the rename
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record["file"] = out_file.name
    return record


def _read_index(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _progress(paths: Sequence[Path], enabled: bool) -> Any:
    """`paths`, behind a progress bar when `enabled`."""
    if not enabled:
        return paths
    from tqdm.auto import tqdm

    return tqdm(paths, desc="slice cache", unit="study")

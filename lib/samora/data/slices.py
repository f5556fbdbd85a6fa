"""Volume -> 2D slice stacks for SAM (single slice repeated, or 2.5D neighbours) and resizing to/from SAM's size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from samora.config import CONTEXTS

__all__ = [
    "CONTEXTS",
    "Letterbox",
    "informative_slices",
    "iter_slice_batches",
    "resize_back",
    "resize_image",
    "resize_label",
    "slice_stack",
]


def informative_slices(
    volume01: np.ndarray, axis: int, min_foreground: float = 0.05, threshold: float = 0.05
) -> list[int]:
    """Indices along `axis` whose fraction of voxels above `threshold` is at least `min_foreground`."""
    volume01 = np.asarray(volume01)
    axis = _check_axis(volume01, axis)
    other = tuple(a for a in range(volume01.ndim) if a != axis)
    fraction = (volume01 > threshold).mean(axis=other)
    return [int(i) for i in np.flatnonzero(fraction >= min_foreground)]


def slice_stack(volume01: np.ndarray, axis: int, index: int, context: str = "single") -> np.ndarray:
    """(3, H, W) float32 input for one slice: the slice three times ("single") or slices i-1, i, i+1 ("2.5d")."""
    volume01 = np.asarray(volume01)
    axis = _check_axis(volume01, axis)
    depth = volume01.shape[axis]
    if not -depth <= index < depth:
        raise IndexError(f"slice index {index} out of range for axis {axis} of size {depth}")
    index = index % depth
    if context == "single":
        indices = [index] * 3
    elif context == "2.5d":
        # clamp at the ends: the first/last slice stands in for its missing neighbour
        indices = [max(index - 1, 0), index, min(index + 1, depth - 1)]
    else:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    # np.take keeps the remaining two axes in their original order, so (H, W) is the volume's own layout
    return np.stack([np.take(volume01, i, axis=axis) for i in indices]).astype(np.float32, copy=False)


def iter_slice_batches(
    volume01: np.ndarray, axis: int, batch_size: int, context: str = "single", indices: Sequence[int] | None = None
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (indices, (b, 3, H, W) float32) over every slice along `axis` in order (or the given indices)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    volume01 = np.asarray(volume01)
    axis = _check_axis(volume01, axis)
    order = list(range(volume01.shape[axis])) if indices is None else [int(i) for i in indices]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, np.stack([slice_stack(volume01, axis, i, context) for i in chunk])


def resize_image(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) images to (B, C, size, size), antialiased when shrinking."""
    _check_4d(x, "x")
    return _bilinear(x, (size, size))


def resize_label(y: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) integer labels to (B, size, size) or (B, h, w); never new class ids."""
    if y.ndim != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(y.shape)}")
    if y.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {y.dtype}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(y.shape[-2:]) == size:
        return y.clone()
    # "nearest-exact" samples pixel centres symmetrically; plain "nearest" shifts labels by up to half a pixel.
    # float64 holds every int32 label exactly, so the round trip through interpolate cannot create new ids.
    out = F.interpolate(y[:, None].to(torch.float64), size=size, mode="nearest-exact")
    return out[:, 0].round().to(y.dtype)


def resize_back(probs: torch.Tensor, hw: tuple[int, int] | Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, K, S, S) probabilities/logits back to the slice's (H, W)."""
    _check_4d(probs, "probs")
    return _bilinear(probs, (int(hw[0]), int(hw[1])))


# Which way the model sees a slice: rows along the anterior-posterior axis, columns along the left-right axis, in
# the directions below (world RAS: +1 = index grows towards anterior / the patient's right; this is how a RAS-stored
# NIfTI reads row by row). Measured with LiteMedSAM and per-slice truth boxes on the abdominal CT of the shared test
# data (5 axial slices, every structure present, mean Dice): this orientation 0.83; array order (rows left-right)
# 0.72; radiological display (both flipped) 0.79; rows flipped 0.78; columns flipped 0.80.
ROW_TOWARDS = +1  # row index grows towards anterior (A-P axis of RAS)
COL_TOWARDS = +1  # column index grows towards the patient's right (R-L axis of RAS)


@dataclass(frozen=True)
class Letterbox:
    """The one mapping between a slice's (H, W) array grid and the model's S x S input, used by training,
    inference, the SSL cache and prompts alike. The slice is first shown the way the model was trained to see
    anatomy (transposed and/or flipped, see `for_volume`), then its longest side is scaled to S (LiteMedSAM's own
    pipeline), the other keeps the aspect ratio, and the rest is zero padding at the bottom/right. Outputs are
    cropped, resized and turned back onto the exact array grid."""

    height: int
    width: int
    size: int
    transpose: bool = False  # shown rows = array columns
    flip_rows: bool = False  # on the shown grid, after the transpose
    flip_cols: bool = False

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.size) < 1:
            raise ValueError(f"letterbox needs positive sizes, got {self.height}x{self.width} -> {self.size}")

    @classmethod
    def for_volume(cls, affine: np.ndarray | None, shape: Sequence[int], axis: int, size: int) -> Letterbox:
        """The letterbox of a volume's slices along `axis`, oriented from its voxel-to-RAS affine (None: identity)."""
        rows, cols = [a for a in range(3) if a != axis]
        direction = np.eye(3) if affine is None else np.asarray(affine, dtype=np.float64)[:3, :3]
        transpose = abs(direction[1, cols]) > abs(direction[1, rows])  # the array's columns run anterior-posterior
        shown_rows, shown_cols = (cols, rows) if transpose else (rows, cols)
        return cls(
            int(shape[rows]),
            int(shape[cols]),
            size,
            transpose=bool(transpose),
            flip_rows=bool(np.sign(direction[1, shown_rows]) != ROW_TOWARDS),
            flip_cols=bool(np.sign(direction[0, shown_cols]) != COL_TOWARDS),
        )

    @property
    def shown(self) -> tuple[int, int]:
        """(h, w) of the slice as the model sees it, before resizing."""
        return (self.width, self.height) if self.transpose else (self.height, self.width)

    @property
    def scale(self) -> float:
        """Model pixels per slice pixel."""
        return self.size / max(self.height, self.width)

    @property
    def inner(self) -> tuple[int, int]:
        """(h, w) of the resized slice inside the S x S input (the rest is padding)."""
        h, w = self.shown
        return (max(1, int(h * self.scale + 0.5)), max(1, int(w * self.scale + 0.5)))

    def _show(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(-1, -2) if self.transpose else x
        dims = [d for d, flip in ((-2, self.flip_rows), (-1, self.flip_cols)) if flip]
        return x.flip(dims) if dims else x

    def _unshow(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d, flip in ((-2, self.flip_rows), (-1, self.flip_cols)) if flip]
        x = x.flip(dims) if dims else x
        return x.transpose(-1, -2) if self.transpose else x

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, S, S): area-averaged when shrinking, bilinear when enlarging, zero padded."""
        _check_4d(x, "x")
        x = self._show(x if x.is_floating_point() else x.float())
        h, w = self.inner
        if (h, w) != tuple(x.shape[-2:]):
            shrinking = h <= x.shape[-2] and w <= x.shape[-1]
            mode = {"mode": "area"} if shrinking else {"mode": "bilinear", "align_corners": False}
            x = F.interpolate(x, size=(h, w), **mode)
        return F.pad(x, (0, self.size - w, 0, self.size - h))

    def label(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, W) integer labels -> (B, S, S), nearest neighbour (never a new class id), zero padded."""
        h, w = self.inner
        resized = resize_label(self._show(y), (h, w))
        return F.pad(resized, (0, self.size - w, 0, self.size - h))

    def back(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, S, S) probabilities or logits -> (B, K, H, W) on the slice's array grid (padding cropped)."""
        _check_4d(maps, "maps")
        h, w = self.inner
        return self._unshow(_bilinear(maps[..., :h, :w], self.shown))

    def _shown_index(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Array (row, col) indices -> indices on the shown grid."""
        rows, cols = (cols, rows) if self.transpose else (rows, cols)
        h, w = self.shown
        return (h - 1 - rows if self.flip_rows else rows), (w - 1 - cols if self.flip_cols else cols)

    def points(self, rows_cols: np.ndarray) -> np.ndarray:
        """(N, 2) array (row, col) indices -> (N, 2) model (x, y) at the voxel centres."""
        rows_cols = np.asarray(rows_cols, dtype=np.float32).reshape(-1, 2)
        r, c = self._shown_index(rows_cols[:, 0], rows_cols[:, 1])
        return (np.stack([c, r], axis=1) + 0.5).astype(np.float32) * np.float32(self.scale)

    def box(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Inclusive array row/col range -> model box (x0, y0, x1, y1) on the voxels' outer edges."""
        r, c = self._shown_index(np.array([r0, r1], np.float32), np.array([c0, c1], np.float32))
        s = self.scale
        return np.array([c.min() * s, r.min() * s, (c.max() + 1) * s, (r.max() + 1) * s], dtype=np.float32)


def _bilinear(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == hw:
        return x if x.is_floating_point() else x.float()
    x = x if x.is_floating_point() else x.float()
    shrinking = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    # antialias low-pass filters before subsampling so thin structures do not alias into stripes
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrinking)


def _check_4d(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")


def _check_axis(volume: np.ndarray, axis: int) -> int:
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    return axis % 3

"""Volumes in, slices out: IO with RAS affines, intensity windows, slice stacks, an on-disk slice cache, phantoms."""

from samora.data.intensity import IntensityWindow, default_for, normalise, set_ct_window
from samora.data.phantoms import PHANTOM_LABELS, make_phantom, write_phantom_studies
from samora.data.slice_cache import SliceCache, SliceDataset, discover_studies
from samora.data.slices import (
    Letterbox,
    informative_slices,
    iter_slice_batches,
    resize_back,
    resize_image,
    resize_label,
    slice_stack,
)
from samora.data.volumes import (
    Volume,
    VolumeError,
    axial_axis_of,
    load_label,
    load_volume,
    save_image,
    save_label,
)

__all__ = [
    "PHANTOM_LABELS",
    "IntensityWindow",
    "Letterbox",
    "SliceCache",
    "SliceDataset",
    "Volume",
    "VolumeError",
    "axial_axis_of",
    "default_for",
    "discover_studies",
    "informative_slices",
    "iter_slice_batches",
    "load_label",
    "load_volume",
    "make_phantom",
    "normalise",
    "resize_back",
    "resize_image",
    "resize_label",
    "save_image",
    "save_label",
    "set_ct_window",
    "slice_stack",
    "write_phantom_studies",
]

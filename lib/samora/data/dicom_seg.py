"""A label volume as a DICOM Segmentation (SEG) of its source CT/MR series, and back; written and read by highdicom.

Segments carry the label's name, its display colour and a SNOMED CT code where pydicom knows the organ; the SEG
references every source instance and shares the series' frame of reference. Reading refuses a SEG that was made
for another series, and returns the segment numbers with their names so the caller can match classes by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from skimage.color import rgb2lab

import samora
from samora.data.dicom_grid import frames_to_volume, slice_spacing, volume_to_frames

ANATOMY = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
ORGAN = hd.sr.CodedConcept("113343008", "SCT", "Organ")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class SegError(ValueError):
    """A SEG cannot be written or does not belong to the series; the message names the problem."""


@dataclass(frozen=True)
class Segment:
    """One class of a label volume: its value there, its name and its display colour (RGB 0-255)."""

    value: int
    name: str
    colour: tuple[int, int, int]


def write_seg(
    labels: np.ndarray, affine: np.ndarray, sources: list[Dataset], segments: list[Segment], description: str
) -> Dataset:
    """A SEG of `labels` (on the grid `affine` maps) over the source series; every listed segment, even empty."""
    values = [s.value for s in segments]
    if len(set(values)) != len(values) or 0 in values:
        raise SegError(f"segment values must be distinct and non-zero: {values}")
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *values})
    if unknown:
        raise SegError(f"label values {unknown} have no segment (known: {dict((s.name, s.value) for s in segments)})")
    # highdicom numbers segments 1..n; the frames carry segment numbers, not the label's own values
    renumber = np.zeros(int(max(values)) + 1, dtype=np.uint8)
    for number, segment in enumerate(segments, start=1):
        renumber[segment.value] = number
    frames = renumber[volume_to_frames(np.asarray(labels).astype(np.int64), affine, sources)]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(n, s) for n, s in enumerate(segments, start=1)],
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="SAMora",
        manufacturer_model_name="samora",
        software_versions=samora.__version__,
        device_serial_number="0",
        series_description=description[:64],
        # empty frames are left out, except when every frame is empty: a SEG needs at least one frame
        omit_empty_frames=bool(frames.any()),
    )
    _add_slice_spacing(seg, sources)
    return seg


def _add_slice_spacing(seg: Dataset, sources: list[Dataset]) -> None:
    # readers that rebuild a volume take the frame distance from SpacingBetweenSlices, else from SliceThickness,
    # which is often not the distance between slices (1.25 mm slices every 1 mm); highdicom writes only the latter
    spacing = slice_spacing(sources)
    if spacing:
        seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices = round(spacing, 6)


def _description(number: int, segment: Segment) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="SAMora", version=samora.__version__, family=codes.cid7162.ArtificialIntelligence
    )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.name,
        segmented_property_category=ANATOMY,
        segmented_property_type=_property_type(segment.name),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    description.RecommendedDisplayCIELabValue = list(_cielab(segment.colour))
    return description


def _property_type(name: str) -> hd.sr.CodedConcept:
    """SNOMED CT code of the organ when pydicom's code dictionary has it by name (kidney_left -> KidneyLeft?)."""
    words = [w.capitalize() for w in name.replace("-", "_").split("_") if w]
    for candidate in ("".join(words), "".join(reversed(words))):
        try:
            code = getattr(codes.SCT, candidate)
        except AttributeError:
            continue
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    return ORGAN


def _cielab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    lab = rgb2lab(np.asarray(rgb, dtype=float).reshape(1, 1, 3) / 255.0)[0, 0]
    return hd.color.CIELabColor(
        float(lab[0]), float(np.clip(lab[1], -128, 127)), float(np.clip(lab[2], -128, 127))
    ).value


def read_seg(
    seg: Dataset, sources: list[Dataset], affine: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, list[dict]]:
    """The SEG as a volume of segment numbers on the source series' grid, and [{"name", "idx"}] per segment."""
    check_references(seg, sources)
    parsed = hd.seg.Segmentation.from_dataset(seg, copy=False)
    numbers = list(parsed.segment_numbers)
    if not numbers:
        raise SegError(f"SEG {seg.SeriesInstanceUID} has no segments")
    frames = parsed.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(h.SOPInstanceUID) for h in sources],
        segment_numbers=numbers,
        combine_segments=True,
        relabel=False,
        assert_missing_frames_are_empty=True,  # frames omitted by the writer are empty, not unknown
    )
    volume = frames_to_volume(np.asarray(frames, dtype=np.uint16), affine, sources, shape)
    info = [{"name": str(parsed.get_segment_description(n).SegmentLabel), "idx": int(n)} for n in numbers]
    return volume, info


def check_references(seg: Dataset, sources: list[Dataset]) -> None:
    """The SEG was made for this series: SOP class, frame of reference, study, series and every instance match."""
    if str(seg.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise SegError(f"not a DICOM SEG (SOP class {seg.get('SOPClassUID', 'missing')})")
    source = sources[0]
    if seg.get("FrameOfReferenceUID") != source.get("FrameOfReferenceUID"):
        raise SegError(
            f"SEG {seg.SeriesInstanceUID}: frame of reference {seg.get('FrameOfReferenceUID')} is not the series' "
            f"{source.get('FrameOfReferenceUID')}"
        )
    if seg.get("StudyInstanceUID") != source.StudyInstanceUID:
        raise SegError(
            f"SEG {seg.SeriesInstanceUID} belongs to study {seg.get('StudyInstanceUID')}, not to "
            f"{source.StudyInstanceUID}"
        )
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if referenced != {str(source.SeriesInstanceUID)}:
        raise SegError(
            f"SEG {seg.SeriesInstanceUID} references series {sorted(referenced) or 'none'}, "
            f"not {source.SeriesInstanceUID}"
        )
    instances = {
        str(ref.ReferencedSOPInstanceUID)
        for item in seg.ReferencedSeriesSequence
        for ref in item.get("ReferencedInstanceSequence", [])
    }
    unknown = instances - {str(h.SOPInstanceUID) for h in sources}
    if unknown:
        raise SegError(f"SEG {seg.SeriesInstanceUID} references {len(unknown)} instance(s) not in the series")

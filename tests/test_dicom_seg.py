"""DICOM SEG written by samora (highdicom) and read back by highdicom and by an independent parser (pydicom-seg)."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import SimpleITK as sitk
from dicom_helpers import write_ct_series
from skimage.color import lab2rgb

from samora.data import load_volume
from samora.data.dicom_grid import GridMismatch, read_series_headers, volume_to_frames
from samora.data.dicom_seg import SegError, Segment, read_seg, write_seg
from samora.data.series_nrrd import write_series_nrrd

SEGMENTS = [
    Segment(1, "liver", (221, 130, 101)),
    Segment(2, "thoracic_spine", (241, 214, 145)),
    Segment(3, "heart", (206, 110, 84)),
    Segment(4, "spleen", (157, 108, 162)),  # never drawn in this label: an empty segment
]


@pytest.fixture(scope="module")
def ct3(shared_data):
    folder = shared_data / "ct_3slice_dcmqi"
    label = nib.load(str(folder / "label.nii.gz"))
    return {
        "headers": read_series_headers(folder / "dicom"),
        "labels": np.asarray(label.dataobj).astype(np.int64),
        "affine": label.affine,
        "image": nib.load(str(folder / "image.nii.gz")),
    }


def _saved(seg, tmp_path) -> pydicom.Dataset:
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    return pydicom.dcmread(path)


def test_series_frames_are_the_nifti_voxels(ct3, shared_data):
    """The grid mapping: the DICOM files' own pixels (HU) equal the NIfTI's voxels at the mapped positions."""
    frames = volume_to_frames(np.asarray(ct3["image"].dataobj), ct3["image"].affine, ct3["headers"])
    by_uid = {}
    for path in (shared_data / "ct_3slice_dcmqi" / "dicom").iterdir():
        ds = pydicom.dcmread(path)
        by_uid[ds.SOPInstanceUID] = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(frames, np.stack([by_uid[h.SOPInstanceUID] for h in ct3["headers"]]))


def test_round_trip_with_highdicom(ct3, tmp_path):
    seg = _saved(write_seg(ct3["labels"], ct3["affine"], ct3["headers"], SEGMENTS, "samora test"), tmp_path)
    volume, info = read_seg(seg, ct3["headers"], ct3["affine"], ct3["labels"].shape)
    assert info == [{"name": s.name, "idx": n} for n, s in enumerate(SEGMENTS, start=1)]
    np.testing.assert_array_equal(volume, ct3["labels"])
    assert not (volume == 4).any()  # spleen: described, empty
    source = ct3["headers"][0]
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert [str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {h.SOPInstanceUID for h in ct3["headers"]}
    for item, segment in zip(seg.SegmentSequence, SEGMENTS, strict=True):
        assert item.SegmentLabel == segment.name
        lab = np.asarray(item.RecommendedDisplayCIELabValue, float) / 65535 * [100, 255, 255] - [0, 128, 128]
        rgb = lab2rgb(lab.reshape(1, 1, 3))[0, 0] * 255
        np.testing.assert_allclose(rgb, segment.colour, atol=2)
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"


def test_independent_parser_sees_the_source_geometry_and_masks(ct3, shared_data, tmp_path):
    """pydicom-seg (MONAI Label's reader) rebuilds each segment's mask in patient space from the SEG alone."""
    seg = _saved(write_seg(ct3["labels"], ct3["affine"], ct3["headers"], SEGMENTS, "samora test"), tmp_path)
    result = pydicom_seg.SegmentReader().read(seg)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(shared_data / "ct_3slice_dcmqi" / "dicom")))
    source = reader.Execute()
    assert sorted(result.available_segments) == list(range(1, len(SEGMENTS) + 1))
    for number in result.available_segments:
        mask = result.segment_image(number)
        np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), atol=1e-3)
        np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-6)
        # both images are on the source grid: compare voxel for voxel (SimpleITK arrays are z, y, x)
        expected = volume_to_frames(ct3["labels"], ct3["affine"], ct3["headers"]) == SEGMENTS[number - 1].value
        got = sitk.GetArrayFromImage(mask).astype(bool)
        order = np.argsort([h.ImagePositionPatient[2] for h in ct3["headers"]])
        np.testing.assert_array_equal(got, expected[order])


def test_all_empty_label_still_makes_a_readable_seg(ct3, tmp_path):
    empty = np.zeros_like(ct3["labels"])
    seg = _saved(write_seg(empty, ct3["affine"], ct3["headers"], SEGMENTS, "empty"), tmp_path)
    volume, info = read_seg(seg, ct3["headers"], ct3["affine"], empty.shape)
    assert len(info) == len(SEGMENTS) and not volume.any()


@pytest.mark.parametrize(
    ("tag", "message"), [("SeriesInstanceUID", "references series"), ("FrameOfReferenceUID", "frame of reference")]
)
def test_seg_of_another_series_is_refused(ct3, tmp_path, tag, message):
    other, uid = copy.deepcopy(ct3["headers"]), pydicom.uid.generate_uid()
    for header in other:
        setattr(header, tag, uid)
    seg = _saved(write_seg(ct3["labels"], ct3["affine"], other, SEGMENTS, "other"), tmp_path)
    with pytest.raises(SegError, match=message):
        read_seg(seg, ct3["headers"], ct3["affine"], ct3["labels"].shape)


def test_bad_labels_are_refused(ct3):
    with pytest.raises(SegError, match=r"label values \[7\]"):
        write_seg(np.where(ct3["labels"] == 3, 7, ct3["labels"]), ct3["affine"], ct3["headers"], SEGMENTS, "x")
    with pytest.raises(GridMismatch, match="frames"):
        write_seg(ct3["labels"][:, :, :2], ct3["affine"], ct3["headers"], SEGMENTS, "x")
    shifted = ct3["affine"].copy()
    shifted[0, 3] += 0.4  # half a voxel: the label no longer sits on the series' pixels
    with pytest.raises(GridMismatch, match="voxel off"):
        write_seg(ct3["labels"], shifted, ct3["headers"], SEGMENTS, "x")


def test_written_ct_series_has_the_nifti_geometry(shared_data, tmp_path):
    """The multi-slice series the PACS tests upload: read back as a DICOM folder it is the NIfTI slab exactly."""
    nifti = shared_data / "ct_abdomen_totalseg" / "image.nii.gz"
    folder = write_ct_series(nifti, tmp_path / "series", slice(50, 58))
    volume = load_volume(folder)
    img = nib.load(str(nifti))
    slab = np.asarray(img.dataobj)[:, :, 50:58]
    expected_affine = img.affine.copy()
    expected_affine[:3, 3] = img.affine[:3, :3] @ [0, 0, 50] + img.affine[:3, 3]
    frames = volume_to_frames(slab, expected_affine, read_series_headers(folder))
    np.testing.assert_array_equal(volume_to_frames(volume.array, volume.affine, read_series_headers(folder)), frames)


def test_series_nrrd_lies_on_the_ct_as_itk_reads_it(ct3, shared_data, tmp_path):
    """The NRRD for OHIF: its bytes in the series' frame order and its header on the CT's geometry as ITK/GDCM read
    the series itself (not samora's reader): the liver label falls on soft tissue, the spine label on bone."""
    path = write_series_nrrd(ct3["labels"], ct3["affine"], ct3["headers"], tmp_path / "labels.nrrd")
    labels = sitk.ReadImage(path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(shared_data / "ct_3slice_dcmqi" / "dicom")))
    ct = reader.Execute()
    np.testing.assert_allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(labels.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), ct.GetDirection(), atol=1e-6)
    values, hu = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(ct)
    assert values.dtype == np.uint8 and values.shape == hu.shape == (3, 512, 512)
    assert 0 < hu[values == 1].mean() < 100 and hu[values == 2].mean() > 200  # liver ~40 HU, thoracic spine bone
    with pytest.raises(ValueError, match="uint8"):
        write_series_nrrd(ct3["labels"] * 100, ct3["affine"], ct3["headers"], tmp_path / "big.nrrd")

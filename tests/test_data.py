"""Tests for samora.data: volume IO and validation, intensity windows, slices, the slice cache and phantoms."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from samora.data import (
    PHANTOM_LABELS,
    IntensityWindow,
    SliceCache,
    SliceDataset,
    Volume,
    VolumeError,
    axial_axis_of,
    default_for,
    discover_studies,
    informative_slices,
    iter_slice_batches,
    load_label,
    load_volume,
    make_phantom,
    normalise,
    resize_back,
    resize_image,
    resize_label,
    save_label,
    set_ct_window,
    slice_stack,
    write_phantom_studies,
)

# ../shared/data beside the project (overridable like in conftest.py); the scans are used in place, never copied
DATA = Path(os.environ.get("SAMORA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared(relative: str) -> Path:
    """Path of a shared real scan, skipping the test when the shared data folder is not there."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data not found: {path} (expected ../shared/data next to the project)")
    return path


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def write_dicom_series(
    folder: Path, series_uid: str, z_positions: list[float], modality: str = "CT", reverse_files: bool = False
) -> np.ndarray:
    """Write a tiny axial DICOM series (rows=6, cols=5); slice k holds 100*k + pattern. Returns (rows, cols, k)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = 6, 5
    pattern = np.arange(rows * cols, dtype=np.int16).reshape(rows, cols) * 3 - 1000
    pixels = np.stack([pattern + 100 * k for k in range(len(z_positions))], axis=-1)
    order = list(range(len(z_positions)))
    for file_number, k in enumerate(reversed(order) if reverse_files else order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{series_uid[-6:]}_{file_number:02d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality = "phantom", modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.InstanceNumber = file_number + 1
        ds.ImagePositionPatient = [-10.0, 20.0, z_positions[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.7]  # row spacing (along y), column spacing (along x)
        ds.SliceThickness = abs(z_positions[1] - z_positions[0])
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels[..., k].astype(np.int16).tobytes()
        ds.save_as(str(path), write_like_original=False)
    return pixels


# ---------------------------------------------------------------------------------------------------------------
# volumes: real scans


def test_load_ct_nifti_real() -> None:
    vol = load_volume(shared("ct_abdomen_totalseg/image.nii.gz"))
    assert vol.shape == (122, 101, 112)
    assert vol.array.dtype == np.float32 and vol.affine.dtype == np.float64 and vol.affine.shape == (4, 4)
    assert np.allclose(vol.spacing, (3.0, 3.0, 3.0), atol=1e-3)
    assert vol.modality == "CT"
    assert vol.axial_axis == 2
    assert vol.array.min() == pytest.approx(-1207.0) and vol.array.max() == pytest.approx(3382.0)


def test_load_mr_nrrd_real_affine_is_ras() -> None:
    import nrrd

    path = shared("mr_brain_pyradiomics/image.nrrd")
    vol = load_volume(path)
    assert vol.modality == "MR"
    assert vol.shape == (256, 256, 25)
    assert np.allclose(vol.spacing, (0.78125, 0.78125, 6.5), atol=1e-4)
    assert vol.axial_axis == 2
    # the NRRD header is LPS with one row per axis: the RAS affine must be diag(-1,-1,1) times its transpose
    header = nrrd.read_header(str(path))
    flip = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(vol.affine[:3, :3], flip @ np.asarray(header["space directions"]).T, atol=1e-5)
    assert np.allclose(vol.affine[:3, 3], flip @ np.asarray(header["space origin"]), atol=1e-4)


def test_dicom_series_matches_its_nifti() -> None:
    folder = shared("ct_3slice_dcmqi")
    dcm = load_volume(folder / "dicom")
    nii = load_volume(folder / "image.nii.gz")
    assert dcm.shape == nii.shape == (512, 512, 3)
    assert np.allclose(dcm.spacing, nii.spacing, atol=1e-4)
    assert np.allclose(dcm.affine, nii.affine, atol=1e-3)
    assert dcm.axial_axis == nii.axial_axis == 2
    np.testing.assert_array_equal(dcm.array, nii.array)  # same voxel order, rescale applied
    assert dcm.modality == "CT"


def test_load_label_real_matches_image() -> None:
    image = load_volume(shared("ct_abdomen_totalseg/image.nii.gz"))
    labels, affine = load_label(shared("ct_abdomen_totalseg/label.nii.gz"), like=image)
    assert labels.dtype == np.int16 and labels.shape == image.shape
    assert np.allclose(affine, image.affine)
    assert 5 not in np.unique(labels) and {0, 1, 2}.issubset(set(np.unique(labels).tolist()))


# ---------------------------------------------------------------------------------------------------------------
# volumes: synthetic DICOM


def test_dicom_slices_sorted_by_position_and_modality_from_tag(tmp_path: Path) -> None:
    z = [10.0, 12.5, 15.0, 17.5]
    pixels = write_dicom_series(tmp_path / "s", "1.2.826.0.1.3680043.8.498.11", z, modality="MR", reverse_files=True)
    vol = load_volume(tmp_path / "s")
    assert vol.modality == "MR"  # the tag wins over HU-looking values
    assert vol.shape == (5, 6, 4)  # (columns, rows, slices), like NIfTI's x, y, z
    for k in range(4):
        np.testing.assert_array_equal(vol.array[:, :, k], pixels[..., k].T)
    assert np.allclose(vol.spacing, (0.7, 0.5, 2.5))
    expected = np.array([[-0.7, 0, 0, 10.0], [0, -0.5, 0, -20.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
    assert np.allclose(vol.affine, expected, atol=1e-4)


def test_dicom_dir_with_two_series_names_both(tmp_path: Path) -> None:
    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.21", "1.2.826.0.1.3680043.8.498.22"
    write_dicom_series(tmp_path / "mixed", uid_a, [0.0, 1.0, 2.0])
    write_dicom_series(tmp_path / "mixed", uid_b, [0.0, 1.0, 2.0])
    with pytest.raises(VolumeError) as err:
        load_volume(tmp_path / "mixed")
    message = str(err.value)
    assert uid_a in message and uid_b in message and "mixed" in message


def test_empty_dir_is_not_a_dicom_series(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(VolumeError, match="no readable DICOM"):
        load_volume(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# volumes: validation errors


def _ct_like(shape: tuple[int, ...] = (8, 9, 10)) -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, size=shape).astype(np.int16)


def test_truncated_nifti(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", _ct_like((20, 20, 20)))
    data = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated.nii.gz.*(unreadable|corrupt)"):
        load_volume(bad)
    assert load_volume(good).shape == (20, 20, 20)


def test_not_a_gzip_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(VolumeError, match="garbage.nii.gz"):
        load_volume(bad)


def test_2d_and_4d_rejected_but_single_frame_4d_accepted(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"flat.nii.gz.*2D"):
        load_volume(write_nifti(tmp_path / "flat.nii.gz", _ct_like((8, 9))))
    with pytest.raises(VolumeError, match=r"series.nii.gz.*4D.*2 channels"):
        load_volume(write_nifti(tmp_path / "series.nii.gz", _ct_like((8, 9, 10, 2))))
    single = load_volume(write_nifti(tmp_path / "one.nii.gz", _ct_like((8, 9, 10, 1))))
    assert single.shape == (8, 9, 10)


def test_constant_volume_rejected_unless_unchecked(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "blank.nii.gz", np.full((6, 6, 6), 7, dtype=np.int16))
    with pytest.raises(VolumeError, match=r"blank.nii.gz.*same value 7"):
        load_volume(path)
    assert load_volume(path, check=False).array.max() == 7


def test_nan_voxels_rejected(tmp_path: Path) -> None:
    array = np.random.default_rng(1).normal(size=(6, 6, 6)).astype(np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    with pytest.raises(VolumeError, match=r"nan.nii.gz: 2 voxels are NaN/Inf"):
        load_volume(write_nifti(tmp_path / "nan.nii.gz", array))


@pytest.mark.parametrize("spacing", [60.0, 1e-9])
def test_absurd_spacing_rejected(tmp_path: Path, spacing: float) -> None:
    path = write_nifti(tmp_path / "spacing.nii.gz", _ct_like(), np.diag([1.0, 1.0, spacing, 1.0]))
    with pytest.raises(VolumeError, match=r"spacing.nii.gz.*spacing"):
        load_volume(path)


def test_non_finite_affine_rejected(tmp_path: Path) -> None:
    # nibabel refuses to write a non-finite affine, so patch the sform rows of a valid uncompressed header
    path = write_nifti(tmp_path / "inf_affine.nii", _ct_like())
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.array([0, 1], dtype="<i2").tobytes()  # qform_code 0, sform_code 1: the sform rules
    raw[280:328] = np.array([[1, 0, 0, 0], [0, np.inf, 0, 0], [0, 0, 1, 0]], dtype="<f4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(VolumeError, match=r"inf_affine.nii"):
        load_volume(path)


def test_nrrd_broken_header(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4\nencoding: nonsense\n\n" + b"\0" * 10)
    with pytest.raises(VolumeError, match=r"broken.nrrd.*(unreadable|corrupt)"):
        load_volume(bad)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="no such file"):
        load_volume(tmp_path / "absent.nii.gz")
    other = tmp_path / "scan.png"
    other.write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match="unsupported format"):
        load_volume(other)


def test_modality_guess_and_override(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "ct.nii.gz", _ct_like())
    assert load_volume(path).modality == "CT"
    assert load_volume(path, modality="mr").modality == "MR"
    mr = write_nifti(tmp_path / "mr.nii.gz", np.random.default_rng(2).uniform(0, 800, (8, 8, 8)).astype(np.float32))
    assert load_volume(mr).modality == "MR"
    with pytest.raises(ValueError):
        load_volume(path, modality="PET")


def test_axial_axis_of_permuted_and_oblique() -> None:
    # voxel axis 0 runs superior (a sagittal/coronal acquisition stored with z first)
    assert axial_axis_of(np.array([[0, 0, 1, 0], [0, 1, 0, 0], [-2, 0, 0, 0], [0, 0, 0, 1.0]])) == 0
    # oblique: axis 1 tilted 30 degrees from superior still wins over axis 2 tilted 60 degrees
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    affine = np.eye(4)
    affine[:3, 1] = [0, s, c]
    affine[:3, 2] = [0, c, -s]
    assert axial_axis_of(affine) == 1
    vol = Volume(np.zeros((2, 3, 4), np.float32), affine, "x", "CT")
    assert vol.axial_axis == 1 and vol.shape == (2, 3, 4)


# ---------------------------------------------------------------------------------------------------------------
# labels


def test_load_label_mismatch_errors(tmp_path: Path) -> None:
    image_path = write_nifti(tmp_path / "img.nii.gz", _ct_like((8, 9, 10)))
    image = load_volume(image_path)
    wrong_shape = write_nifti(tmp_path / "lab_shape.nii.gz", np.zeros((8, 9, 11), np.uint8))
    with pytest.raises(VolumeError, match=r"lab_shape.nii.gz.*\(8, 9, 11\).*img.nii.gz.*\(8, 9, 10\)"):
        load_label(wrong_shape, like=image)
    shifted = np.eye(4)
    shifted[0, 3] = 0.01
    wrong_affine = write_nifti(tmp_path / "lab_affine.nii.gz", np.zeros((8, 9, 10), np.uint8), shifted)
    with pytest.raises(VolumeError, match=r"lab_affine.nii.gz.*img.nii.gz"):
        load_label(wrong_affine, like=image)
    tiny_shift = np.eye(4)
    tiny_shift[0, 3] = 1e-4
    ok = write_nifti(tmp_path / "lab_ok.nii.gz", np.zeros((8, 9, 10), np.uint8), tiny_shift)
    assert load_label(ok, like=image)[0].shape == (8, 9, 10)


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nrrd", "seg.nii"])
@pytest.mark.parametrize("high", [5, 300])
def test_save_label_round_trip(tmp_path: Path, name: str, high: int) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, high + 1, size=(7, 8, 9)).astype(np.int16)
    labels[0, 0, 0] = high
    # oblique, anisotropic, translated: catches transposed direction matrices and LPS/RAS sign slips
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.8 * c, -0.9 * s, 0, -12.5], [0.8 * s, 0.9 * c, 0, 40.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    out = save_label(labels, affine, tmp_path / name)
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left behind
    loaded, loaded_affine = load_label(out)
    np.testing.assert_array_equal(loaded, labels)
    assert np.allclose(loaded_affine, affine, atol=1e-4)
    if name.endswith(".nii.gz"):
        stored = nib.load(str(out)).get_data_dtype()
        assert stored == (np.uint8 if high <= 255 else np.int16)


def test_save_label_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3D"):
        save_label(np.zeros((4, 4), np.uint8), np.eye(4), tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="integer"):
        save_label(np.full((2, 2, 2), 0.5), np.eye(4), tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="unsupported"):
        save_label(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "a.mha")


# ---------------------------------------------------------------------------------------------------------------
# intensity


def test_normalise_hu_window_known_values() -> None:
    hu = np.array([-1000, -125, 75, 275, 2000], dtype=np.float32).reshape(1, 1, 5)
    out = normalise(hu, IntensityWindow.ct_abdomen())
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    wide = normalise(hu, IntensityWindow.ct_wide()).ravel()
    np.testing.assert_allclose(wide, [0.0, 0.4375, 0.5375, 0.6375, 1.0], atol=1e-6)


def test_normalise_percentile_ignores_background() -> None:
    rng = np.random.default_rng(4)
    volume = np.zeros((40, 40, 40), dtype=np.float32)  # 90% zero background
    volume[:, :, :4] = rng.uniform(100, 200, size=(40, 40, 4))
    out = normalise(volume, IntensityWindow.mr())
    assert out.min() >= 0.0 and out.max() <= 1.0
    middle = np.abs(volume - 150) < 0.5
    # with the background counted the low percentile would be 0 and 150 would map to ~0.75
    assert np.allclose(out[middle], 0.5, atol=0.02)


@pytest.mark.parametrize("window", [IntensityWindow.ct_abdomen(), IntensityWindow.mr()])
def test_normalise_constant_volume_gives_zeros(window: IntensityWindow) -> None:
    out = normalise(np.full((4, 5, 6), 100.0, dtype=np.float32), window)
    assert out.shape == (4, 5, 6) and not np.isnan(out).any() and not out.any()


def test_window_presets_and_validation() -> None:
    assert IntensityWindow.ct_soft_tissue() == IntensityWindow("hu", -160.0, 240.0)
    # LiteMedSAM's CT window (level 40 / width 400) is the default; the app's conf ct_window replaces it
    assert default_for("ct") == IntensityWindow("hu", -160.0, 240.0)
    assert IntensityWindow.default_for("MR").kind == "percentile"
    set_ct_window(IntensityWindow.from_level_width(75.0, 400.0))
    try:
        assert default_for("CT") == IntensityWindow.ct_abdomen()
        with pytest.raises(ValueError, match="Hounsfield"):
            set_ct_window(IntensityWindow.mr())
    finally:
        set_ct_window(IntensityWindow.from_level_width(40.0, 400.0))
    with pytest.raises(ValueError):
        IntensityWindow("hu", 10.0, -10.0)
    with pytest.raises(ValueError):
        IntensityWindow("gamma", 0.0, 1.0)
    with pytest.raises(ValueError):
        default_for("US")


# ---------------------------------------------------------------------------------------------------------------
# slices


def test_informative_slices_skip_air_on_real_ct() -> None:
    vol = load_volume(shared("ct_abdomen_totalseg/image.nii.gz"))
    air = np.full(vol.shape[:2] + (5,), -1000.0, dtype=np.float32)
    padded = np.concatenate([air, vol.array, air], axis=2)  # 5 air slices above and below the scan
    volume01 = normalise(padded, IntensityWindow.ct_abdomen())
    kept = informative_slices(volume01, axis=2)
    assert kept, "a real abdominal CT must have informative slices"
    assert all(5 <= k < 5 + vol.shape[2] for k in kept)
    fraction = (volume01 > 0.05).mean(axis=(0, 1))
    assert all(fraction[k] >= 0.05 for k in kept)
    assert all(fraction[k] < 0.05 for k in set(range(padded.shape[2])) - set(kept))


def test_slice_stack_contexts() -> None:
    volume = np.broadcast_to(np.arange(6, dtype=np.float32)[None, :, None], (4, 6, 5)).copy()  # value = index on axis 1
    single = slice_stack(volume, axis=1, index=2, context="single")
    assert single.shape == (3, 4, 5) and single.dtype == np.float32 and np.all(single == 2)
    middle = slice_stack(volume, axis=1, index=2, context="2.5d")
    assert [float(c.mean()) for c in middle] == [1.0, 2.0, 3.0]
    assert [float(c.mean()) for c in slice_stack(volume, 1, 0, "2.5d")] == [0.0, 0.0, 1.0]
    assert [float(c.mean()) for c in slice_stack(volume, 1, 5, "2.5d")] == [4.0, 5.0, 5.0]
    # H, W keep the original order of the remaining axes
    ramp = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    np.testing.assert_array_equal(slice_stack(ramp, axis=1, index=3)[0], ramp[:, 3, :])
    with pytest.raises(IndexError):
        slice_stack(volume, 1, 6)
    with pytest.raises(ValueError):
        slice_stack(volume, 1, 0, context="3d")


def test_iter_slice_batches_covers_all_in_order() -> None:
    volume = np.random.default_rng(5).random((7, 8, 9), dtype=np.float32)
    seen = []
    for indices, batch in iter_slice_batches(volume, axis=0, batch_size=3, context="2.5d"):
        assert batch.shape == (len(indices), 3, 8, 9) and len(indices) <= 3
        for i, stack in zip(indices, batch, strict=True):
            np.testing.assert_array_equal(stack[1], volume[i])
        seen += indices
    assert seen == list(range(7))


def test_resize_label_is_nearest_and_keeps_ids() -> None:
    labels = torch.zeros(2, 37, 23, dtype=torch.long)
    labels[0, 5:20, 3:15] = 3
    labels[1, 10:30, 10:20] = 7
    labels[1, 0, 0] = 1
    for size in (16, 64):
        out = resize_label(labels, size)
        assert out.shape == (2, size, size) and out.dtype == torch.long
        assert set(out.unique().tolist()) <= {0, 1, 3, 7}
    up = resize_label(labels, 74)
    assert {3, 7}.issubset(set(up.unique().tolist()))
    block = torch.tensor([[[0, 0, 5, 5], [0, 0, 5, 5], [2, 2, 0, 0], [2, 2, 0, 0]]])
    assert resize_label(block, 2).tolist() == [[[0, 5], [2, 0]]]
    with pytest.raises(TypeError):
        resize_label(labels.float(), 8)


def test_resize_image_and_back() -> None:
    x = torch.rand(2, 3, 50, 70)
    small = resize_image(x, 32)
    assert small.shape == (2, 3, 32, 32) and small.min() >= 0 and small.max() <= 1
    constant = torch.full((1, 1, 50, 70), 0.25)
    assert torch.allclose(resize_image(constant, 128), constant.new_full((1, 1, 128, 128), 0.25))
    probs = torch.softmax(torch.randn(2, 4, 32, 32), dim=1)
    back = resize_back(probs, (50, 70))
    assert back.shape == (2, 4, 50, 70)
    assert torch.allclose(back.sum(1), torch.ones(2, 50, 70), atol=1e-5)  # bilinear keeps probabilities summing to 1


# ---------------------------------------------------------------------------------------------------------------
# slice cache


def test_discover_studies_layout(tmp_path: Path) -> None:
    img = _ct_like((4, 4, 4))
    write_nifti(tmp_path / "b.nii.gz", img)
    write_nifti(tmp_path / "a.nii", img)
    write_nifti(tmp_path / "label.nii.gz", img)
    write_nifti(tmp_path / ".hidden.nii.gz", img)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "labels" / "final").mkdir(parents=True)
    write_nifti(tmp_path / "labels" / "final" / "b.nii.gz", img)
    write_nifti(tmp_path / "labels" / "c.nii.gz", img)
    (tmp_path / "case1").mkdir()
    write_nifti(tmp_path / "case1" / "image.nii.gz", img)
    write_nifti(tmp_path / "case1" / "liver_seg.nii.gz", img)
    write_dicom_series(tmp_path / "case1" / "dicom", "1.2.826.0.1.3680043.8.498.31", [0.0, 1.0])
    write_dicom_series(tmp_path / "series", "1.2.826.0.1.3680043.8.498.32", [0.0, 1.0])
    found = [p.relative_to(tmp_path).as_posix() for p in discover_studies(tmp_path)]
    assert found == ["a.nii", "b.nii.gz", "case1/dicom", "case1/image.nii.gz", "series"]


def test_slice_cache_real_chest_builds_reuses_and_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import samora.data.slice_cache as slice_cache

    studies = discover_studies(shared("ct_chest_totalseg"))
    assert [p.name for p in studies] == ["aorta_crop.nii.gz", "pulmonary_crop.nii.gz"]
    cache_dir = tmp_path / "cache"
    cache = SliceCache.build(studies, cache_dir, size=32, progress=False)
    assert cache.study_ids == ["aorta_crop", "pulmonary_crop"]
    assert len(cache) == sum(a.shape[0] for a in cache.arrays) > 100
    assert all(isinstance(a, np.memmap) and a.dtype == np.uint8 for a in cache.arrays)
    assert all(not a.flags.writeable for a in cache.arrays)
    for i in (0, len(cache) // 2, -1):
        item = cache[i]
        assert item.shape == (3, 32, 32) and item.dtype == np.float32
        assert 0.0 <= item.min() and item.max() <= 1.0
        np.testing.assert_array_equal(item[0], item[2])  # "single" context repeats the slice
    assert max(float(cache[i].max()) for i in range(0, len(cache), 10)) > 0.5  # not all blank

    npy_times = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")}
    assert len(npy_times) == 2

    def no_reload(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rebuild with unchanged inputs must not read any study")

    monkeypatch.setattr(slice_cache, "load_volume", no_reload)
    again = SliceCache.build(studies, cache_dir, size=32, progress=False)
    assert again.data_hash == cache.data_hash and len(again) == len(cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")} == npy_times
    reopened = SliceCache.open(cache_dir)
    np.testing.assert_array_equal(reopened[7], cache[7])
    # different settings -> different hash -> the (patched) loader is called
    with pytest.raises(AssertionError, match="must not read"):
        SliceCache.build(studies, cache_dir, size=48, progress=False)
    # so does another default CT window (conf ct_window), which shapes every slice of a CT without its own window
    monkeypatch.setattr("samora.data.intensity._ct_window", IntensityWindow.from_level_width(50.0, 350.0))
    with pytest.raises(AssertionError, match="must not read"):
        SliceCache.build(studies, cache_dir, size=32, progress=False)
    monkeypatch.undo()

    dataset = SliceDataset(reopened, transform=lambda t: t * 2.0)
    sample = dataset[3]
    assert isinstance(sample, torch.Tensor) and sample.shape == (3, 32, 32)
    assert torch.allclose(sample, torch.from_numpy(reopened[3]) * 2.0)


def test_slice_cache_25d_and_skipped_study(tmp_path: Path) -> None:
    image, _, affine = make_phantom(0, shape=(32, 32, 12))
    write_nifti(tmp_path / "p.nii.gz", image, affine)
    write_nifti(tmp_path / "blank.nii.gz", np.zeros((8, 8, 8), np.int16))
    studies = [tmp_path / "blank.nii.gz", tmp_path / "p.nii.gz"]
    cache = SliceCache.build(studies, tmp_path / "c", size=16, context="2.5d", progress=False)
    assert cache.study_ids == ["p"] and "blank.nii.gz" in next(iter(cache.index["skipped"]))
    assert cache.arrays[0].shape[1:] == (3, 16, 16)
    study, index = cache.slice_info(4)
    assert study == "p" and 0 < index < 11
    middle = cache[4]
    assert not np.array_equal(middle[0], middle[2])  # 2.5d channels are different slices


# ---------------------------------------------------------------------------------------------------------------
# phantoms


def test_phantom_deterministic_and_varied() -> None:
    a_img, a_lab, a_aff = make_phantom(7)
    b_img, b_lab, _ = make_phantom(7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab, _ = make_phantom(8)
    assert not np.array_equal(a_lab, c_lab) and not np.array_equal(a_img, c_img)
    liver = PHANTOM_LABELS["liver"]
    centroid_a = np.argwhere(a_lab == liver).mean(0)
    centroid_c = np.argwhere(c_lab == liver).mean(0)
    assert np.linalg.norm(centroid_a - centroid_c) > 0.5  # organs move between seeds
    assert a_img.dtype == np.int16 and a_lab.dtype == np.int16 and a_img.shape == (96, 96, 48)
    assert np.allclose(a_aff[:3, :3], np.diag([3.0, 3.0, 3.0]))  # RAS, diagonal, spacing on the diagonal
    assert np.allclose(a_aff[:3, 3], -(np.array([96, 96, 48]) - 1) / 2 * 3.0)  # volume centred at the origin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_anatomy_and_intensities(seed: int) -> None:
    image, labels, affine = make_phantom(seed)
    assert set(np.unique(labels).tolist()) == {0, *PHANTOM_LABELS.values()}
    bands = {"liver": (45, 75), "spleen": (35, 65), "kidney_left": (120, 180), "kidney_right": (120, 180)}
    bands["spine"] = (400, 700)
    for name, (low, high) in bands.items():
        mean = float(image[labels == PHANTOM_LABELS[name]].mean())
        assert low <= mean <= high, f"{name} mean {mean:.1f} HU outside [{low}, {high}]"
    assert float(np.median(image[0:3, 0:3, :])) < -900  # corners are air
    centroids = {n: np.argwhere(labels == k).mean(0) for n, k in PHANTOM_LABELS.items()}
    centre = (np.asarray(labels.shape) - 1) / 2
    # RAS: axis 0 increases to the patient's right, axis 1 anterior
    assert centroids["liver"][0] > centre[0] > centroids["spleen"][0]
    assert centroids["kidney_right"][0] > centre[0] > centroids["kidney_left"][0]
    assert centroids["spine"][1] < centre[1] and abs(centroids["spine"][0] - centre[0]) < 5
    assert axial_axis_of(affine) == 2


def test_write_phantom_studies_layout(tmp_path: Path) -> None:
    store, truth = tmp_path / "studies", tmp_path / "truth"
    info = write_phantom_studies(store, n_labeled=2, n_unlabeled=1, seed=3, shape=(32, 32, 12), truth_dir=truth)
    assert info == {"labeled": ["phantom_000", "phantom_001"], "unlabeled": ["phantom_002"], "labels": PHANTOM_LABELS}
    assert sorted(p.name for p in store.glob("*.nii.gz")) == [f"phantom_00{i}.nii.gz" for i in range(3)]
    final = sorted(p.name for p in (store / "labels" / "final").iterdir())
    assert final == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert sorted(p.name for p in truth.iterdir()) == ["phantom_002.nii.gz"]
    volume = load_volume(store / "phantom_001.nii.gz")
    assert volume.modality == "CT" and volume.shape == (32, 32, 12)
    labels, _ = load_label(store / "labels" / "final" / "phantom_001.nii.gz", like=volume)
    expected_image, expected_labels, _ = make_phantom(4, shape=(32, 32, 12))
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(volume.array, expected_image)
    assert [p.relative_to(store).as_posix() for p in discover_studies(store)] == [
        "phantom_000.nii.gz",
        "phantom_001.nii.gz",
        "phantom_002.nii.gz",
    ]
    # re-running with the same arguments leaves identical files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("*.nii.gz")}
    write_phantom_studies(store, n_labeled=2, n_unlabeled=1, seed=3, shape=(32, 32, 12), truth_dir=truth)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.nii.gz")} == mtimes
    with gzip.open(store / "phantom_000.nii.gz") as f:
        assert len(f.read()) > 352  # a real gzip'd NIfTI, not an empty placeholder


# ----- letterbox: the one slice <-> model-input mapping ------------------------------------------------------------

ORIENTATIONS = [(t, fr, fc) for t in (False, True) for fr in (False, True) for fc in (False, True)]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_letterbox_keeps_aspect_pads_and_maps_back_exactly_onto_the_grid(orientation):
    from samora.data import Letterbox

    box = Letterbox(122, 101, 256, *orientation)
    yy, xx = np.mgrid[0:122, 0:101]
    smooth = torch.as_tensor(np.sin(yy / 9.0) + np.cos(xx / 7.0) + yy / 50.0, dtype=torch.float32)[None, None]
    shown = box.image(smooth)
    h, w = box.inner
    assert shown.shape == (1, 1, 256, 256) and max(h, w) == 256 and min(h, w) == round(101 * 256 / 122)
    assert shown[..., h:, :].eq(0).all() and shown[..., :, w:].eq(0).all() and min(h, w) < 256  # padding bottom/right
    back = box.back(shown)
    assert back.shape == smooth.shape and (back - smooth).abs().max() < 0.1


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_letterbox_label_box_and_points_agree_in_every_orientation(orientation):
    from samora.data import Letterbox

    box = Letterbox(122, 101, 256, *orientation)
    label = torch.zeros(1, 122, 101, dtype=torch.int64)
    label[0, 30:61, 10:41] = 3  # rows 30..60, cols 10..40
    model_label = box.label(label)[0].numpy()
    assert set(np.unique(model_label)) == {0, 3}
    ys, xs = np.nonzero(model_label)
    x0, y0, x1, y1 = box.box(30, 60, 10, 40)
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
    x, y = box.points(np.array([[45, 25]]))[0]  # a voxel inside the rectangle lands inside its model image
    assert model_label[int(y), int(x)] == 3
    assert box.back(torch.as_tensor(model_label == 3, dtype=torch.float32)[None, None])[0, 0].numpy()[45, 25] > 0.5


def test_letterbox_orientation_follows_the_affine():
    from samora.data import Letterbox

    ras = np.diag([3.0, 3.0, 3.0, 1.0])  # array axes: i -> right, j -> anterior
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])  # i -> left, j -> posterior
    swapped = np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # i -> anterior
    a = Letterbox.for_volume(ras, (122, 101, 40), 2, 256)
    b = Letterbox.for_volume(lps, (122, 101, 40), 2, 256)
    c = Letterbox.for_volume(swapped, (122, 101, 40), 2, 256)
    assert (a.transpose, a.flip_rows, a.flip_cols) == (True, False, False)
    assert (b.transpose, b.flip_rows, b.flip_cols) == (True, True, True)
    assert (c.transpose, c.flip_rows, c.flip_cols) == (False, False, False)
    # the same anatomy stored RAS or LPS reaches the model as the same picture
    image = torch.rand(1, 1, 122, 101, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.image(image), b.image(image.flip(-1, -2)))

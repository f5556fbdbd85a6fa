"""Bad input through DICOMweb: each request is refused with a 4xx naming the problem, Orthanc keeps exactly what it
had, and the server goes on answering. Tiny random preset: the checks run before any model does."""

from __future__ import annotations

import copy
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import requests
from app_helpers import ServerProcess, app_conf, start_server, stop_server
from dicom_helpers import orthanc_binary, start_orthanc, stop_orthanc
from monailabel.client.client import MONAILabelClientException
from pydicom.uid import generate_uid

from samora.data.dicom_grid import read_series_headers, volume_to_frames
from samora.data.dicom_seg import Segment, read_seg, write_seg

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        orthanc_binary() is None,
        reason="Orthanc + DICOMweb plugin not installed (scripts/setup.sh installs them as root)",
    ),
]

RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"
BOX = {"label": "liver", "roi": [200, 300, 200, 300, 1, 1]}


def _copy_series(source: Path, target: Path, edit) -> str:
    """A copy of the dcmqi series under new study/series/instance UIDs, each file changed by edit(ds)."""
    target.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        edit(ds)
        ds.save_as(target / path.name)
    return series


def _no_geometry(ds: pydicom.Dataset) -> None:
    del ds.ImagePositionPatient


def _not_an_image(ds: pydicom.Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = RAW_DATA_STORAGE
    del ds.PixelData


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("pacs_bad")
    source = shared_data / "ct_3slice_dcmqi" / "dicom"
    bad = {
        "no_geometry": _copy_series(source, tmp / "no_geometry", _no_geometry),
        "not_image": _copy_series(source, tmp / "not_image", _not_an_image),
    }
    orthanc = start_orthanc(tmp / "orthanc")
    server = None
    try:
        for folder in (source, tmp / "no_geometry", tmp / "not_image"):
            orthanc.upload(folder)
        server = start_server(orthanc.dicomweb, app_conf(tmp, labels="liver=1,spleen=2"), tmp / "work")
        yield {"orthanc": orthanc, "server": server, "bad": bad, "source": source, "tmp": tmp}
    finally:
        if server is not None:
            assert not stop_server(server)
        stop_orthanc(orthanc)


def _refused(server: ServerProcess, call) -> str:
    with pytest.raises(MONAILabelClientException) as refused:
        call()
    message = str(refused.value)
    assert any(f"{code}" in message for code in (404, 422)), message
    assert server.client.info()["name"] == "SAMora"  # still answering
    return message


@pytest.mark.parametrize(
    ("series", "expected"),
    [("no_geometry", "ImagePositionPatient"), ("not_image", "not images")],
)
def test_unusable_series_is_refused(setup, series, expected):
    before = setup["orthanc"].instances()
    uid = setup["bad"][series]
    message = _refused(setup["server"], lambda: setup["server"].client.infer("samora_prompt", uid, BOX))
    assert expected in message and uid in message, message
    assert f"image {uid}: series {uid}" in message  # what was asked for, then what is wrong with it
    assert setup["orthanc"].instances() == before


def test_unknown_series_is_refused(setup):
    uid = generate_uid()
    message = _refused(setup["server"], lambda: setup["server"].client.infer("samora_prompt", uid, BOX))
    assert f"no series {uid} in the PACS" in message


def _seg_file(setup, headers, name: str) -> Path:
    labels = np.zeros((512, 512, 3), np.uint8)
    labels[200:260, 200:260, 1] = 1
    affine = nib.load(str(setup["source"].parent / "image.nii.gz")).affine
    seg = write_seg(labels, affine, headers, [Segment(1, "liver", (221, 130, 101))], "client SEG")
    path = setup["tmp"] / f"{name}.dcm"
    seg.save_as(path)
    return path


def test_seg_for_an_unknown_study_is_refused(setup):
    headers = read_series_headers(setup["source"])
    image = str(headers[0].SeriesInstanceUID)
    elsewhere = copy.deepcopy(headers)
    study, series = generate_uid(), generate_uid()
    for h in elsewhere:
        h.StudyInstanceUID, h.SeriesInstanceUID = study, series
    before = setup["orthanc"].instances()
    server = setup["server"]
    upload = _seg_file(setup, elsewhere, "unknown_study")
    message = _refused(server, lambda: server.client.save_label(image, str(upload), tag="final"))
    assert "belongs to study" in message and study in message, message
    # and a label for a series the PACS does not have
    unknown = generate_uid()
    message = _refused(server, lambda: server.client.save_label(unknown, str(upload), tag="final"))
    assert f"no series {unknown}" in message
    assert setup["orthanc"].instances() == before


def test_client_seg_of_the_series_is_accepted(setup):
    """The control: the same upload made for the right series is stored (so the refusals above are specific)."""
    headers = read_series_headers(setup["source"])
    before = len(setup["orthanc"].instances())
    upload = _seg_file(setup, headers, "right_series")
    setup["server"].client.save_label(str(headers[0].SeriesInstanceUID), str(upload), tag="final")
    assert len(setup["orthanc"].instances()) == before + 1


def _infer_form(setup, model: str, image: str, output: str, params: dict) -> requests.Response:
    url = f"{setup['server'].url}/infer/{model}"
    form = {"params": json.dumps(params)}
    return requests.post(url, params={"image": image, "output": output}, data=form, timeout=300)


def test_infer_as_dicom_seg_is_written_by_highdicom(setup):
    """/infer?output=dicom_seg: a SEG of the series (MONAI Label's own path needs dcmqi, not installed), equal to
    the NIfTI result of the same request; a malformed label_info is a 422 naming it."""
    headers = read_series_headers(setup["source"])
    uid = str(headers[0].SeriesInstanceUID)
    params = {**BOX, "label_info": [{"name": "liver", "idx": 1}]}
    answer = _infer_form(setup, "samora_prompt", uid, "dicom_seg", params)
    assert answer.status_code == 200, answer.text
    seg = pydicom.dcmread(io.BytesIO(answer.content))
    image = nib.load(str(setup["source"].parent / "image.nii.gz"))
    volume, info = read_seg(seg, headers, image.affine, image.shape)
    assert info == [{"name": "liver", "idx": 1}]
    as_nifti = _infer_form(setup, "samora_prompt", uid, "image", params)
    assert as_nifti.status_code == 200, as_nifti.text
    expected = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(as_nifti.content)).dataobj)
    np.testing.assert_array_equal(volume, expected)

    bad = _infer_form(setup, "samora_prompt", uid, "dicom_seg", {**BOX, "label_info": "liver"})
    assert bad.status_code == 422 and "label_info must be a list" in bad.text, bad.text
    assert setup["server"].client.info()["name"] == "SAMora"


def test_infer_as_nrrd_is_in_the_series_frame_order(setup):
    """What OHIF's panel asks for: uint8 raw NRRD, columns fastest, frames ascending along the normal."""
    headers = read_series_headers(setup["source"])
    uid = str(headers[0].SeriesInstanceUID)
    params = {**BOX, "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
    answer = _infer_form(setup, "samora_prompt", uid, "image", params)
    assert answer.status_code == 200, answer.text
    path = setup["tmp"] / "result.nrrd"
    path.write_bytes(answer.content)
    frames, header = nrrd.read(str(path), index_order="C")
    assert header["type"] == "uint8" and header["encoding"] == "raw" and frames.shape == (3, 512, 512)
    np.testing.assert_allclose(header["space origin"], [float(v) for v in headers[0].ImagePositionPatient])
    as_nifti = _infer_form(setup, "samora_prompt", uid, "image", {k: v for k, v in params.items() if "result" not in k})
    expected = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(as_nifti.content)).dataobj)
    image = nib.load(str(setup["source"].parent / "image.nii.gz"))
    np.testing.assert_array_equal(frames, volume_to_frames(expected, image.affine, headers))

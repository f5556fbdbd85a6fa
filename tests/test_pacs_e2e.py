"""The app against a real Orthanc (DICOMweb) on loopback, driven by MONAI Label's own client.

Two CT series are uploaded to Orthanc: the 3-file dcmqi series and a 3-slice series written from the TotalSegmentator
NIfTI. The same conf serves them twice: from Orthanc (`--studies http://127.0.0.1:PORT/dicom-web`) and from a local
folder holding the NIfTI files of the same images. One model version, trained once for the module from the dcmqi
series' liver label saved through the PACS server (a SEG in Orthanc), serves both. Results must agree voxel for voxel,
and the SEGs Orthanc stores must parse back (with highdicom, against the source series) to the same masks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from app_helpers import ServerProcess, start_server, stop_server
from dicom_helpers import (
    Orthanc,
    orthanc_binary,
    save_liver_label,
    start_orthanc,
    stop_orthanc,
    train_first_version,
    write_ct_series,
)
from monailabel.client.client import MONAILabelClientException

from samora.data import load_volume, save_image
from samora.data.dicom_grid import read_series_headers
from samora.data.dicom_seg import read_seg

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,  # real LiteMedSAM on both paths plus one short training: about 7 min on 2 loaded cores
    pytest.mark.skipif(
        orthanc_binary() is None,
        reason="Orthanc + DICOMweb plugin not installed (scripts/setup.sh installs them as root)",
    ),
]

SLAB = slice(55, 58)  # 3 axial slices through liver and kidneys of ct_abdomen_totalseg


def _conf(tmp: Path) -> dict[str, str]:
    """Real LiteMedSAM, cheap: cached training, no automatic training or bootstrap, one shared model folder."""
    return {
        "train_mode": "cached",
        "train_every": "0",
        "bootstrap": "off",
        "threads": "2",
        "model_dir": str(tmp / "model"),
        "labels": "liver=1,spleen=2,kidney_left=3,kidney_right=4",
    }


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, shared_data) -> Iterator[dict]:
    """Orthanc with both series, a server on it and a server on the NIfTI files of the same images."""
    tmp = tmp_path_factory.mktemp("pacs")
    series = {
        "ct3": shared_data / "ct_3slice_dcmqi" / "dicom",
        "slab": write_ct_series(shared_data / "ct_abdomen_totalseg" / "image.nii.gz", tmp / "slab", SLAB),
    }
    orthanc = start_orthanc(tmp / "orthanc")
    servers: list[ServerProcess] = []
    try:
        for folder in series.values():
            orthanc.upload(folder)
        uids = {name: read_series_headers(folder)[0].SeriesInstanceUID for name, folder in series.items()}
        nifti = tmp / "nifti"
        nifti.mkdir()
        for name, folder in series.items():  # the same voxels as NIfTI, named by series UID like the PACS ids
            volume = load_volume(folder)
            save_image(volume.array.astype(np.int16), volume.affine, nifti / f"{uids[name]}.nii.gz")
        servers.append(start_server(orthanc.dicomweb, _conf(tmp), tmp / "work_pacs"))
        servers.append(start_server(nifti, _conf(tmp), tmp / "work_nifti"))
        yield {"orthanc": orthanc, "pacs": servers[0], "nifti": servers[1], "uids": uids, "series": series, "tmp": tmp}
    finally:
        for server in servers:
            assert not stop_server(server), "processes left running after stopping the server"
        stop_orthanc(orthanc)


@pytest.fixture(scope="module")
def trained(pacs, shared_data) -> dict:
    """Model version 1, trained through the PACS server on the dcmqi series' liver label (stored as a SEG first)."""
    server = pacs["pacs"]
    with pytest.raises(MONAILabelClientException, match="no trained model version"):
        server.client.infer("samora", pacs["uids"]["ct3"], {})
    folder = shared_data / "ct_3slice_dcmqi"
    save_liver_label(server, folder / "dicom", folder / "label.nii.gz", pacs["tmp"])
    seconds = train_first_version(server)
    print(f"training from the SEG: {seconds:.1f}s")
    return server.client.info()["train_stats"]["samora"]


def _infer(server: ServerProcess, model: str, image: str, params: dict | None = None) -> np.ndarray:
    path, _ = server.client.infer(model, image, params or {})
    assert path, f"infer {model} on {image} returned no file"
    return np.asarray(nib.load(path).dataobj)


def _new_segs(orthanc: Orthanc, before: list[str], series_uid: str) -> list[pydicom.Dataset]:
    """The SEG instances Orthanc got since `before` (its instance ids) that reference `series_uid`."""
    out = []
    for instance in sorted(set(orthanc.instances()) - set(before)):
        ds = orthanc.instance_file(instance)
        refs = [str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])]
        if ds.Modality == "SEG" and series_uid in refs:
            out.append(ds)
    return out


def _parse_seg(pacs: dict, name: str, seg: pydicom.Dataset) -> tuple[np.ndarray, list[dict]]:
    """The SEG as a label volume on the grid the NIfTI server uses for the same image."""
    image = nib.load(str(pacs["tmp"] / "nifti" / f"{pacs['uids'][name]}.nii.gz"))
    return read_seg(seg, read_series_headers(pacs["series"][name]), image.affine, image.shape)


def test_studies_are_listed(pacs):
    server = pacs["pacs"]
    status, stats = server.get("/datastore/?output=stats")
    assert status == 200 and stats["total"] == 2, stats
    assert server.client.next_sample("first", {})["id"] in pacs["uids"].values()
    # what OHIF lists: the studies through the server's DICOMweb proxy
    response = requests.get(f"{server.url}/proxy/dicom/qido/studies", timeout=30)
    assert response.status_code == 200 and len(response.json()) == 2, response.text


def test_prompt_result_saved_as_seg_matches_the_nifti_path(pacs, trained):
    # `trained` first, whatever runs: the version is trained on the liver label alone, not on this SEG too
    uid = pacs["uids"]["ct3"]
    params = {"label": "liver", "roi": [290, 420, 160, 330, 1, 1]}  # a box around the liver on the middle slice
    start = time.monotonic()
    from_pacs = _infer(pacs["pacs"], "samora_prompt", uid, params)
    from_nifti = _infer(pacs["nifti"], "samora_prompt", uid, params)
    print(f"samora_prompt on both paths: {time.monotonic() - start:.1f}s, {int(from_pacs.sum())} voxels")
    assert from_pacs.any(), "the box prompt gave an empty mask"
    np.testing.assert_array_equal(from_pacs, from_nifti)

    upload = pacs["tmp"] / "prompt.nii.gz"
    nib.save(
        nib.Nifti1Image(from_pacs.astype(np.uint8), nib.load(str(pacs["tmp"] / "nifti" / f"{uid}.nii.gz")).affine),
        upload,
    )
    before = pacs["orthanc"].instances()
    pacs["pacs"].client.save_label(uid, str(upload), tag="final", params={"label_info": [{"name": "liver", "idx": 1}]})
    assert len(pacs["orthanc"].instances()) == len(before) + 1
    (seg,) = _new_segs(pacs["orthanc"], before, uid)
    volume, info = _parse_seg(pacs, "ct3", seg)
    assert info == [{"name": "liver", "idx": 1}]
    np.testing.assert_array_equal(volume, from_pacs)
    source = read_series_headers(pacs["series"]["ct3"])
    assert (
        seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID and seg.StudyInstanceUID == source[0].StudyInstanceUID
    )
    assert list(seg.SegmentSequence[0].RecommendedDisplayCIELabValue) != [0, 0, 0]


@pytest.mark.parametrize("name", ["ct3", "slab"])
def test_auto_segmentation_matches_the_nifti_path_and_is_saved_as_seg(pacs, trained, name):
    assert trained["model_version"] == 1 and trained["labeled_studies"] == 1, trained  # the SEG saved for training
    server = pacs["pacs"]
    uid = pacs["uids"][name]
    start = time.monotonic()
    from_pacs = _infer(server, "samora", uid)
    from_nifti = _infer(pacs["nifti"], "samora", uid)
    print(f"samora on {name}, both paths: {time.monotonic() - start:.1f}s, {int((from_pacs == 1).sum())} liver voxels")
    np.testing.assert_array_equal(from_pacs, from_nifti)
    if name == "ct3":  # the series the version was trained on: its liver must show
        assert (from_pacs == 1).sum() > 10_000, np.unique(from_pacs, return_counts=True)
    upload = pacs["tmp"] / f"auto_{name}.nii.gz"
    nib.save(
        nib.Nifti1Image(from_pacs.astype(np.uint8), nib.load(str(pacs["tmp"] / "nifti" / f"{uid}.nii.gz")).affine),
        upload,
    )
    before = pacs["orthanc"].instances()
    server.client.save_label(uid, str(upload), tag="final", params={})
    (seg,) = _new_segs(pacs["orthanc"], before, uid)
    volume, info = _parse_seg(pacs, name, seg)
    # no label_info: every configured label is a segment, the empty ones too, numbered as the conf numbers them
    assert info == [
        {"name": n, "idx": i} for n, i in (("liver", 1), ("spleen", 2), ("kidney_left", 3), ("kidney_right", 4))
    ]
    np.testing.assert_array_equal(volume, from_pacs)

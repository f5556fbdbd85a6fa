"""The app against a real Orthanc (DICOMweb) on loopback, driven by MONAI Label's own client.

Two CT series are uploaded to Orthanc: the 3-file dcmqi series and an 8-slice series written from the TotalSegmentator
NIfTI. The same conf serves them twice: from Orthanc (`--studies http://127.0.0.1:PORT/dicom-web`) and from a local
folder holding the NIfTI files of the same images. Results must agree voxel for voxel, and the SEGs Orthanc stores
must parse back (with highdicom, against the source series) to the same masks.
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
from app_helpers import ServerProcess, start_server, stop_server, wait_for
from dicom_helpers import Orthanc, orthanc_binary, start_orthanc, stop_orthanc, write_ct_series
from monailabel.client.client import MONAILabelClientException

from samora.data import load_volume, save_image
from samora.data.dicom_grid import read_series_headers
from samora.data.dicom_seg import read_seg

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,  # real LiteMedSAM on both paths plus a training: about 6.5 min on 2 shared cores
    pytest.mark.skipif(
        orthanc_binary() is None,
        reason="Orthanc + DICOMweb plugin not installed (scripts/setup.sh installs them as root)",
    ),
]

SLAB = slice(52, 60)  # 8 axial slices through liver and kidneys of ct_abdomen_totalseg
TRAIN_TIMEOUT = 300


def _conf(tmp: Path) -> dict[str, str]:
    """Real LiteMedSAM, cheap: one training epoch, no automatic training or bootstrap, one shared model folder."""
    return {
        "epochs": "2",
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


def _infer(server: ServerProcess, model: str, image: str, params: dict | None = None) -> np.ndarray:
    path, _ = server.client.infer(model, image, params or {})
    assert path, f"infer {model} on {image} returned no file"
    return np.asarray(nib.load(path).dataobj)


def _segs_for(orthanc: Orthanc, series_uid: str) -> list[pydicom.Dataset]:
    """Every SEG instance in Orthanc that references `series_uid` (fetched through Orthanc's REST API)."""
    out = []
    for instance in orthanc.instances():
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
    assert status == 200 and stats["total"] == 2 and stats["completed"] == 0, stats
    assert server.client.next_sample("first", {})["id"] in pacs["uids"].values()
    # what OHIF lists: the studies through the server's DICOMweb proxy
    response = requests.get(f"{server.url}/proxy/dicom/qido/studies", timeout=30)
    assert response.status_code == 200 and len(response.json()) == 2, response.text


def test_prompt_result_saved_as_seg_matches_the_nifti_path(pacs):
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
    before = len(pacs["orthanc"].instances())
    pacs["pacs"].client.save_label(uid, str(upload), tag="final", params={"label_info": [{"name": "liver", "idx": 1}]})
    assert len(pacs["orthanc"].instances()) == before + 1
    (seg,) = _segs_for(pacs["orthanc"], uid)
    volume, info = _parse_seg(pacs, "ct3", seg)
    assert info == [{"name": "liver", "idx": 1}]
    np.testing.assert_array_equal(volume, from_pacs)
    source = read_series_headers(pacs["series"]["ct3"])
    assert (
        seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID and seg.StudyInstanceUID == source[0].StudyInstanceUID
    )
    assert list(seg.SegmentSequence[0].RecommendedDisplayCIELabValue) != [0, 0, 0]


def _train_done(server: ServerProcess):
    try:
        task = server.client.train_status()
    except MONAILabelClientException:
        return None
    return task if task and task.get("status") in ("DONE", "ERROR") else None


def test_saved_seg_trains_a_new_version_and_auto_segmentation_matches(pacs):
    server = pacs["pacs"]
    with pytest.raises(MONAILabelClientException, match="no trained model version"):
        server.client.infer("samora", pacs["uids"]["slab"], {})
    start = time.monotonic()
    server.client.train_start("samora", {"epochs": 2})
    task = wait_for(lambda: _train_done(server), bool, TRAIN_TIMEOUT)
    assert task["status"] == "DONE", task.get("details")
    stats = server.client.info()["train_stats"]["samora"]
    assert stats["model_version"] == 1 and stats["labeled_studies"] == 1, stats  # the SEG saved above
    print(f"training from the SEG: {time.monotonic() - start:.1f}s")

    uid = pacs["uids"]["slab"]
    start = time.monotonic()
    from_pacs = _infer(server, "samora", uid)
    from_nifti = _infer(pacs["nifti"], "samora", uid)
    print(f"samora on both paths: {time.monotonic() - start:.1f}s, labels {np.unique(from_pacs).tolist()}")
    np.testing.assert_array_equal(from_pacs, from_nifti)
    upload = pacs["tmp"] / "auto.nii.gz"
    nib.save(
        nib.Nifti1Image(from_pacs.astype(np.uint8), nib.load(str(pacs["tmp"] / "nifti" / f"{uid}.nii.gz")).affine),
        upload,
    )
    server.client.save_label(uid, str(upload), tag="final", params={})
    (seg,) = _segs_for(pacs["orthanc"], uid)
    volume, info = _parse_seg(pacs, "slab", seg)
    # no label_info: every configured label is a segment, the empty ones too, numbered as the conf numbers them
    assert info == [
        {"name": n, "idx": i} for n, i in (("liver", 1), ("spleen", 2), ("kidney_left", 3), ("kidney_right", 4))
    ]
    np.testing.assert_array_equal(volume, from_pacs)

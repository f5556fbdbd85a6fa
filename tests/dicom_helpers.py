"""Test helpers for DICOM: a CT series written from a NIfTI slab with its geometry tags, and a local Orthanc."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import requests
from app_helpers import ROOT, ServerProcess, free_port, wait_for
from monailabel.client.client import MONAILabelClientException
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from samora.data import load_volume
from samora.data.dicom_grid import read_series_headers

LPS = np.diag([-1.0, -1.0, 1.0])


def write_ct_series(nifti: Path, folder: Path, slices: slice, series_description: str = "samora test CT") -> Path:
    """Axial CT series (one int16 file per slice) of nifti[:, :, slices]; frame pixel [r, c] is voxel [c, r, k]."""
    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj)[:, :, slices].astype(np.int16)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [0, 0, slices.start or 0] + img.affine[:3, 3]
    axes = LPS @ affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    orientation = np.concatenate([axes[:, 0] / spacing[0], axes[:, 1] / spacing[1]])
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(data.shape[2]):
        ds = _ct_dataset(data[:, :, k].T, study, series, frame_of_reference, series_description)
        ds.ImagePositionPatient = [round(float(v), 4) for v in LPS @ affine[:3, :3] @ [0, 0, k] + LPS @ affine[:3, 3]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]  # between rows, columns
        ds.SliceThickness = round(float(spacing[2]), 6)
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"{k + 1:04d}.dcm", write_like_original=False)
    return folder


def _ct_dataset(pixels: np.ndarray, study: str, series: str, frame_of_reference: str, description: str):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
    ds.PatientName, ds.PatientID, ds.StudyID, ds.AccessionNumber = "Samora^Test", "SAMORA-TEST", "1", ""
    ds.StudyDate, ds.StudyTime, ds.PatientBirthDate, ds.PatientSex = "20240101", "120000", "", "O"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "samora tests"
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT", 1, description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


# ----------------------------------------------------------------------------------------------------------------
# a real Orthanc, started and stopped by the project's own script


@dataclass
class Orthanc:
    """An Orthanc started by scripts/orthanc.sh on free loopback ports, storage in `folder`."""

    folder: Path
    http_port: int
    dicom_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def script(self, action: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, ORTHANC_DIR=str(self.folder), ORTHANC_HTTP_PORT=str(self.http_port))
        env["ORTHANC_DICOM_PORT"] = str(self.dicom_port)
        cmd = ["bash", str(ROOT / "scripts" / "orthanc.sh"), action]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    def upload(self, folder: Path) -> list[str]:
        """Store every file of `folder` through Orthanc's REST API; returns the Orthanc instance ids."""
        ids = []
        for path in sorted(folder.iterdir()):
            response = requests.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
            response.raise_for_status()
            ids.append(response.json()["ID"])
        return ids

    def instances(self) -> list[str]:
        return requests.get(f"{self.url}/instances", timeout=30).json()

    def series_of_modality(self, modality: str) -> list[dict]:
        """QIDO-RS series of one modality (DICOM JSON)."""
        response = requests.get(f"{self.dicomweb}/series", params={"Modality": modality}, timeout=30)
        response.raise_for_status()
        return response.json() if response.content else []

    def instance_file(self, orthanc_id: str) -> pydicom.Dataset:
        response = requests.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30)
        response.raise_for_status()
        return pydicom.dcmread(BytesIO(response.content))


def orthanc_binary() -> str | None:
    """Orthanc's binary and its DICOMweb plugin (Debian packages), or None when either is missing."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    return binary if binary and plugin.exists() else None


def start_orthanc(folder: Path) -> Orthanc:
    """Start Orthanc with scripts/orthanc.sh; the caller stops it with stop_orthanc."""
    orthanc = Orthanc(folder, free_port(), free_port())
    result = orthanc.script("start")
    if result.returncode != 0:
        raise RuntimeError(f"scripts/orthanc.sh start failed:\n{result.stdout}\n{result.stderr}")
    return orthanc


def stop_orthanc(orthanc: Orthanc) -> None:
    pid_file = orthanc.folder / "orthanc.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    result = orthanc.script("stop")
    assert result.returncode == 0, result.stderr
    if pid is not None:
        assert not Path(f"/proc/{pid}").exists(), f"Orthanc pid {pid} still runs after scripts/orthanc.sh stop"


# ----------------------------------------------------------------------------------------------------------------
# a first model version for a server on a PACS


def save_liver_label(server: ServerProcess, dicom: Path, label_nifti: Path, tmp: Path) -> None:
    """Save the liver (value 1) of `label_nifti` as the final label of the series in `dicom` (stored as a SEG)."""
    series = load_volume(dicom)
    label = nib.load(str(label_nifti))
    assert np.allclose(label.affine, series.affine, atol=1e-3), "the label is not on the series' grid"
    liver = (np.asarray(label.dataobj) == 1).astype(np.uint8)
    path = tmp / "liver_label.nii.gz"
    nib.save(nib.Nifti1Image(liver, series.affine), str(path))
    uid = str(read_series_headers(dicom)[0].SeriesInstanceUID)
    server.client.save_label(uid, str(path), tag="final", params={"label_info": [{"name": "liver", "idx": 1}]})


# Cached training on the 3-slice CT's liver (LiteMedSAM): training-slice Dice 0.90 after 5 epochs of 3 one-slice
# steps at lr 1e-3, 0.0 after 12 epochs of one 3-slice step; the prompt path is left as it is (it is not compared).
QUICK_TRAINING = {"epochs": 6, "batch_size": 1, "prompt_training": False}


def train_first_version(server: ServerProcess, params: dict = QUICK_TRAINING, timeout: float = 600) -> float:
    """Train `samora` on the server's final labels until model version 1 exists; returns the seconds it took."""
    start = time.monotonic()
    server.client.train_start("samora", dict(params))
    task = wait_for(lambda: _train_done(server), bool, timeout)
    assert task["status"] == "DONE", f"{task.get('details')}\n{server.log_tail()}"
    stats = server.client.info()["train_stats"]["samora"]
    assert stats["model_version"] == 1, stats
    return time.monotonic() - start


def _train_done(server: ServerProcess) -> dict | None:
    try:
        task = server.client.train_status()
    except MONAILabelClientException:
        return None
    return task if task and task.get("status") in ("DONE", "ERROR") else None

"""DICOMweb datastore (Orthanc, a hospital PACS): series are checked before use, labels go back as DICOM SEG.

MONAI Label's own DICOMweb datastore converts with SimpleITK (which invents a geometry when tags are missing) and
writes SEG with dcmqi's itkimage2segimage (downloaded from the internet at start, naming segments by position in
label_info rather than by value). This one keeps its listing, caching and SEG discovery and replaces the
conversions with samora's DICOM reader and its highdicom SEG writer/reader.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile

import pydicom
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.dicomweb_checks import check_image_series
from lib.errors import client_errors
from samora.data import load_volume, save_image, save_label
from samora.data.dicom_grid import read_series_headers
from samora.data.dicom_seg import SegError, Segment, read_seg, write_seg
from samora.data.series_nrrd import write_series_nrrd
from samora.serving.validation import validate_label_upload

log = logging.getLogger(__name__)
FALLBACK_COLOUR = (255, 0, 0)


def dicomweb_client(url: str) -> DICOMwebClientX:
    """MONAI Label's DICOMweb client for `url`, with basic auth from MONAI_LABEL_DICOMWEB_USERNAME / PASSWORD."""
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(
            settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        )
    return DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )


def install_seg_output(datastore: SamoraDicomWebDatastore) -> None:
    """Answer /infer?output=dicom_seg with `datastore`'s highdicom writer: MONAI Label's endpoint calls dcmqi's
    itkimage2segimage, which is not installed (its own DICOMweb datastore downloads it at start)."""
    from monailabel.endpoints import infer as endpoint

    def convert(series_folder: str, result_file: str, label_info, use_itk: bool = True) -> str:
        return datastore.result_as_seg(series_folder, result_file, label_info)

    endpoint.nifti_to_dicom_seg = convert


def colour_of(name: str) -> tuple[int, int, int]:
    """The display colour MONAI Label's viewers use for an anatomy name (kidney_left -> 'left kidney')."""
    words = name.lower().replace("-", "_").split("_")
    for candidate in (" ".join(words), " ".join(reversed(words))):
        if candidate in GENERIC_ANATOMY_COLORS:
            return tuple(int(v) for v in GENERIC_ANATOMY_COLORS[candidate][:3])
    return FALLBACK_COLOUR


class SamoraDicomWebDatastore(DICOMWebDatastore):
    """DICOMWebDatastore whose images are checked series, and whose final labels are highdicom SEGs in the PACS."""

    def __init__(self, url: str, labels: dict[str, int]) -> None:
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        super().__init__(
            client=dicomweb_client(url),
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        )
        self.samora_labels = labels

    # ------------------------------------------------------------------------------------------------ images

    def series_dir(self, series_uid: str, label: bool = False) -> str:
        root = self._datastore.label_path(DefaultLabelTag.FINAL) if label else self._datastore.image_path()
        return os.path.realpath(os.path.join(root, series_uid))

    def get_image_uri(self, image_id: str) -> str:
        """The series as a NIfTI in the cache, made once by samora's DICOM reader after the metadata checks."""
        nifti = os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz")
        if os.path.exists(nifti):
            return nifti
        with client_errors(f"image {image_id}"):
            study = check_image_series(self._client, image_id)
            folder = self.series_dir(image_id)
            if not os.path.isdir(folder) or not os.listdir(folder):
                dicom_web_download_series(study, image_id, folder, self._client, self._fetch_by_frame)
            volume = load_volume(folder)
        with tempfile.TemporaryDirectory() as tmp:
            converted = save_image(volume.array, volume.affine, os.path.join(tmp, f"{image_id}.nii.gz"))
            LocalDatastore.add_image(self, image_id, str(converted), self._dicom_info(image_id))
        return nifti

    def result_as_series_nrrd(self, image_id: str, result_file: str, compress: bool = False) -> str:
        """An infer result (NIfTI on the image grid) as an NRRD in the series' frame order, for OHIF's panel."""
        labels = load_volume(result_file, check=False)
        with client_errors(f"result for {image_id}"):
            headers = read_series_headers(self.series_dir(image_id))
            out = tempfile.NamedTemporaryFile(suffix=".nrrd", delete=False).name
            return write_series_nrrd(labels.array.round(), labels.affine, headers, out, compress)

    def result_as_seg(self, series_folder: str, result_file: str, label_info: list[dict] | None) -> str:
        """An infer result as a DICOM SEG file of the series in `series_folder` (for /infer?output=dicom_seg)."""
        labels = load_volume(result_file, check=False)
        with client_errors(f"SEG of {os.path.basename(series_folder)}"):
            headers = read_series_headers(series_folder)
            seg = write_seg(labels.array.round(), labels.affine, headers, self._segments(label_info), "SAMora result")
        out = tempfile.NamedTemporaryFile(suffix=".dcm", delete=False).name
        seg.save_as(out)
        return out

    # ------------------------------------------------------------------------------------------------ labels

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict, label_id: str = ""):
        """Validate the label against the series; a final label is stored in the PACS as a SEG, then cached."""
        image_uri = self.get_image_uri(image_id)  # 4xx for a series this datastore does not serve
        label_info = dict(label_info or {})
        shown = {label_filename: "the uploaded label", image_uri: image_id}
        with client_errors(f"label for {image_id}", shown), tempfile.TemporaryDirectory() as tmp:
            label_filename = self._as_nifti(image_id, image_uri, label_filename, label_info, tmp)
            validate_label_upload(label_filename, image_uri, self.samora_labels, label_info.get("label_info"))
            if label_tag == DefaultLabelTag.FINAL:
                label_info.update(self._store_seg(image_id, image_uri, label_filename, label_info.get("label_info")))
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)

    def _as_nifti(self, image_id: str, image_uri: str, label_file: str, label_info: dict, tmp: str) -> str:
        """OHIF's raw .bin and DICOM SEG uploads as a NIfTI on the image grid (a SEG's segments give label_info)."""
        suffix = "".join(pathlib.Path(label_file).suffixes).lower()
        if suffix == ".bin":
            return binary_to_image(image_uri, label_file)
        if suffix == ".dcm":
            seg = pydicom.dcmread(label_file)
            nifti, label_info["label_info"] = self._seg_as_nifti(image_id, image_uri, seg, tmp)
            return nifti
        return label_file

    def _seg_as_nifti(self, image_id: str, image_uri: str, seg: Dataset, folder: str) -> tuple[str, list[dict]]:
        """A SEG of the series as a NIfTI of segment numbers on the image grid in `folder`, and its label_info."""
        image = load_volume(image_uri, check=False)
        volume, segments = read_seg(seg, read_series_headers(self.series_dir(image_id)), image.affine, image.shape)
        return str(save_label(volume, image.affine, os.path.join(folder, "seg.nii.gz"))), segments

    def _segments(self, label_info: list[dict] | None) -> list[Segment]:
        """One segment per label_info entry (the viewer's numbering), else one per configured label."""
        if label_info is not None and not (
            isinstance(label_info, list) and all(isinstance(e, dict) for e in label_info)
        ):
            raise SegError(f"label_info must be a list of {{'name', 'idx'}} objects, not {label_info!r:.200}")
        named = [(e["name"], int(e["idx"])) for e in label_info or [] if "name" in e and "idx" in e]
        pairs = named or list(self.samora_labels.items())
        return [Segment(value, str(name), colour_of(str(name))) for name, value in pairs]

    def _store_seg(self, image_id: str, image_uri: str, label_file: str, label_info: list[dict] | None) -> dict:
        """Write the label as a SEG of the source series and STOW it; returns what the cache keeps about it."""
        image = load_volume(image_uri, check=False)
        labels = load_volume(label_file, check=False)
        sources = read_series_headers(self.series_dir(image_id))
        seg = write_seg(labels.array.round(), image.affine, sources, self._segments(label_info), "SAMora label")
        try:
            self._client.store_instances([seg])
        except Exception as e:  # the PACS refused it: nothing was saved, say so
            log.warning("storing SEG for %s failed: %s", image_id, e)
            raise HTTPException(status_code=502, detail=f"label for {image_id}: the PACS refused the SEG: {e}") from e
        log.info("stored SEG %s (%d segments) for series %s", seg.SeriesInstanceUID, len(seg.SegmentSequence), image_id)
        info = self.get_image_info(image_id)
        return {
            "SeriesInstanceUID": str(seg.SeriesInstanceUID),
            "StudyInstanceUID": info.get("StudyInstanceUID"),
            "PatientID": info.get("PatientID"),
            "label_info": [{"name": s.SegmentLabel, "idx": int(s.SegmentNumber)} for s in seg.SegmentSequence],
        }

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Images with a final label: every usable SEG in the PACS is fetched into the cache first (the trainer
        reads labels from the cache, and annotators may have saved SEGs from another viewer)."""
        if label_tag in (None, DefaultLabelTag.FINAL):
            self._download_labeled_data()
        return LocalDatastore.get_labeled_images(self, label_tag or DefaultLabelTag.FINAL, labels)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A SEG from the PACS as a cached NIfTI of segment numbers with their names; a SEG we cannot use is skipped."""
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)  # a cached label, by its image's id
        cached = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if cached and LocalDatastore.get_label_info(self, image_id, label_tag).get("SeriesInstanceUID") == label_id:
            return cached
        folder = self.series_dir(label_id, label=True)
        if not os.path.isdir(folder) or not os.listdir(folder):
            dicom_web_download_series(None, label_id, folder, self._client, self._fetch_by_frame)
        image_uri = self.get_image_uri(image_id)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                seg = pydicom.dcmread(os.path.join(folder, sorted(os.listdir(folder))[0]))
                nifti, segments = self._seg_as_nifti(image_id, image_uri, seg, tmp)
            except ValueError as e:  # SegError, GridMismatch: a SEG made for something else
                log.warning("SEG %s ignored for %s: %s", label_id, image_id, e)
                return ""
            meta = {**self._dicom_info(label_id), "label_info": segments}
            LocalDatastore.save_label(self, image_id, nifti, label_tag, meta)
        return LocalDatastore.get_label_uri(self, image_id, label_tag)

"""Checks on a PACS series from its DICOMweb metadata alone, before any pixel is downloaded."""

from __future__ import annotations

from dicomweb_client import DICOMwebClient
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from samora.data import VolumeError
from samora.data.volumes import DICOM_GEOMETRY_TAGS

PIXEL_DATA = "7FE00010"


def _hex(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def _value(element: dict | None) -> str:
    values = (element or {}).get("Value") or [""]
    return str(values[0])


def check_image_series(client: DICOMwebClient, series_uid: str) -> str:
    """The study of an image series this app can read; FileNotFoundError or VolumeError naming what is wrong."""
    found = [s for s in client.search_for_series(search_filters={"SeriesInstanceUID": series_uid}) if s]
    found = [s for s in found if _value(s.get(_hex("SeriesInstanceUID"))) == series_uid]
    if not found:
        raise FileNotFoundError(f"no series {series_uid} in the PACS")
    study = _value(found[0].get(_hex("StudyInstanceUID")))
    instances = client.retrieve_series_metadata(study, series_uid)
    if not instances:
        raise VolumeError(f"series {series_uid} has no instances")
    for instance in instances:
        _check_instance(instance, series_uid)
    return study


def _check_instance(instance: dict, series_uid: str) -> None:
    sop_class = _value(instance.get(_hex("SOPClassUID")))
    name = UID(sop_class).name if sop_class else "no SOP class"
    if PIXEL_DATA not in instance or "Image Storage" not in name:
        raise VolumeError(
            f"series {series_uid} holds {name} instances ({sop_class}), not images: only CT/MR image series "
            "can be segmented"
        )
    missing = [tag for tag in DICOM_GEOMETRY_TAGS if _hex(tag) not in instance]
    if missing:
        uid = _value(instance.get(_hex("SOPInstanceUID")))
        raise VolumeError(
            f"series {series_uid}: instance {uid} lacks the DICOM tags {missing}: the volume's geometry is unknown"
        )

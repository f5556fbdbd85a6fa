"""Local datastore that validates labels before saving them and writes label files atomically."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from lib.errors import client_errors
from samora.data import load_volume
from samora.serving.validation import UploadError, validate_label_upload

log = logging.getLogger(__name__)


def check_id(image_id: str | None, root: str) -> None:
    """An image id is a plain file stem: no separators, no parent references, resolving inside `root`."""
    if not image_id:
        return
    bad = "/" in image_id or "\\" in image_id or image_id in (".", "..") or "\0" in image_id
    inside = os.path.realpath(os.path.join(root, image_id)).startswith(os.path.realpath(root) + os.sep)
    if bad or not inside:
        raise UploadError(f"invalid image id {image_id!r}: ids are file names without path components")


class SamoraDatastore(LocalDatastore):
    """LocalDatastore whose save_label refuses bad labels (4xx) and never leaves a half-copied label file."""

    def __init__(self, *args, labels: dict[str, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samora_labels = labels

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """Refuse ids that would place a file outside the datastore, and volumes we could not use."""
        with client_errors(f"image {image_id!r}", {image_filename: "the uploaded image"}):
            check_id(image_id, self._datastore.image_path())
            load_volume(image_filename)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        with client_errors(f"label for {image_id!r}"):
            check_id(image_id, self._datastore.image_path())
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        image_uri = self.get_image_uri(image_id)
        with client_errors(f"label for {image_id}", {label_filename: "the uploaded label", image_uri: image_id}):
            validate_label_upload(label_filename, image_uri, self.samora_labels, (label_info or {}).get("label_info"))
        _, ext = self._to_id(os.path.basename(label_filename))
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            os.makedirs(label_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=label_dir)
            os.close(fd)
            try:
                shutil.copyfile(label_filename, tmp)
                os.replace(tmp, os.path.join(label_dir, name))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            info = dict(label_info or {})
            info.update({"ts": int(time.time()), "name": name})
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        log.info("saved %s label for %s", label_tag, image_id)
        return image_id

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
from samora.serving.validation import validate_label_upload

log = logging.getLogger(__name__)


class SamoraDatastore(LocalDatastore):
    """LocalDatastore whose save_label refuses bad labels (4xx) and never leaves a half-copied label file."""

    def __init__(self, *args, labels: dict[str, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samora_labels = labels

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        with client_errors(f"label for {image_id}"):
            validate_label_upload(
                label_filename, self.get_image_uri(image_id), self.samora_labels, (label_info or {}).get("label_info")
            )
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

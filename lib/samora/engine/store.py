"""Versioned model store: publish atomically, keep earlier versions, fall back past a corrupt one."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from samora.io_utils import atomic_write_json
from samora.model import META_FILE, ModelFileError, SamoraModel

log = logging.getLogger(__name__)
_VERSION_DIR = re.compile(r"^v(\d{6})$")


class ModelStore:
    """Folder of versions `v000001/`, ... plus `current.json` naming the published one.

    A version directory appears only by os.replace of a fully written temp directory, and current.json is
    rewritten atomically after it: a crash at any moment leaves the previous version published and loadable.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5) -> None:
        self.root = Path(root)
        self.keep = keep
        self.versions_dir = self.root / "versions"
        self.experts_dir = self.root / "experts"

    def versions(self) -> list[int]:
        """All complete versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [_VERSION_DIR.match(p.name) for p in self.versions_dir.iterdir() if p.is_dir()]
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, version: int) -> Path:
        """Directory of a version."""
        return self.versions_dir / f"v{version:06d}"

    def current_version(self) -> int | None:
        """The published version (from current.json), or the newest complete one if that file is unreadable."""
        try:
            version = int(json.loads((self.root / "current.json").read_text())["version"])
            if self.path(version).is_dir():
                return version
        except (OSError, ValueError, KeyError, TypeError):
            pass
        versions = self.versions()
        return versions[-1] if versions else None

    def publish(self, model: SamoraModel, metadata: dict | None = None) -> int:
        """Save `model` as the next version and make it current. Returns the new version number."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        version = (self.versions()[-1] if self.versions() else 0) + 1
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.versions_dir))
        try:
            published = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            model.save(tmp, metadata={**(metadata or {}), "version": version, "published_at": published})
            os.replace(tmp, self.path(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_json(self.root / "current.json", {"version": version})
        self._prune()
        log.info("published model version %d at %s", version, self.path(version))
        return version

    def expert_files(self) -> list[Path]:
        """The SSL expert weight files saved by the bootstrap, in level order (empty before it has run)."""
        from samora.config import EXPERTS
        from samora.ssl.experts_io import expert_paths

        return [path for path in (expert_paths(self.experts_dir, level)[0] for level in EXPERTS) if path.is_file()]

    def summary(self) -> dict:
        """What a viewer can show about the current version: whether one is trained, its number, how many labelled
        studies trained it, the training mode and when it was published."""
        version = self.current_version()
        if version is None:
            return {"trained": False}
        try:
            meta = json.loads((self.path(version) / META_FILE).read_text())
        except (OSError, ValueError) as e:
            return {"trained": True, "version": version, "error": f"model.json unreadable: {e}"}
        return {
            "trained": True,
            "version": version,
            "labeled_studies": len(meta.get("trained_on") or []),
            "train_mode": meta.get("train_mode"),
            "published_at": meta.get("published_at"),
        }

    def rollback(self, version: int) -> None:
        """Make an earlier version current again."""
        if version not in self.versions():
            raise ValueError(f"version {version} does not exist in {self.versions_dir}")
        atomic_write_json(self.root / "current.json", {"version": version})

    def load_current(self, map_location: str = "cpu", checkpoint: str | None = None) -> tuple[int, SamoraModel] | None:
        """Load the current version; if it is corrupt, report it and use the newest older one that loads."""
        current = self.current_version()
        if current is None:
            return None
        for version in [v for v in reversed(self.versions()) if v <= current]:
            try:
                return version, SamoraModel.load(self.path(version), checkpoint=checkpoint, map_location=map_location)
            except ModelFileError as e:
                log.error("model version %d is unusable (%s); trying the previous version", version, e)
        return None

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep]:
            shutil.rmtree(self.path(version), ignore_errors=True)
        for stale in self.versions_dir.glob(".publish-*"):
            shutil.rmtree(stale, ignore_errors=True)

"""Shared test fixtures: paths to the real scans beside the project, small model configs."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAMORA_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: small real CT/MR scans (never copied into the project)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scans not found at {SHARED_DATA} (set SAMORA_SHARED_DATA)")
    return SHARED_DATA


@contextmanager
def app_client(tmp_path, monkeypatch, **conf_overrides):
    """The SAMora app in-process behind fastapi's TestClient, on a small phantom datastore."""
    from app_helpers import APP_DIR, app_conf, make_datastore
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    store = make_datastore(tmp_path)
    for key, value in {
        "MONAI_LABEL_APP_DIR": str(APP_DIR),
        "MONAI_LABEL_STUDIES": str(store["studies"]),
        "MONAI_LABEL_APP_CONF": app_conf(tmp_path, **conf_overrides),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False,
        "MONAI_LABEL_AUTO_UPDATE_SCORING": False,
        "MONAI_LABEL_TRACKING_ENABLED": False,
        "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"),
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setattr(settings, key, value)
    clear_cache()
    from monailabel.app import app

    try:
        with TestClient(app) as c:
            c.store = store
            yield c
    finally:
        clear_cache()


@pytest.fixture()
def client(tmp_path, monkeypatch):
    """The app with the tiny SAM ViT preset."""
    with app_client(tmp_path, monkeypatch) as c:
        yield c

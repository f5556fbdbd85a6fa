"""Shared test fixtures: paths to the real scans beside the project, small model configs."""

from __future__ import annotations

import os
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

"""Where the benchmarks find the project, the shared data and their scratch folder."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMORA_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_WORK = ROOT / "runs" / "bench"

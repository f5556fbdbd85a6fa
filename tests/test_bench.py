"""The benchmark suite's one command runs end to end in its --quick form and writes its reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("fewshot.json", "efficiency.json", "active_learning.json", "speed.json", "run_all.json")


@pytest.mark.slow
def test_run_all_quick_writes_reports(tmp_path: Path, shared_data: Path) -> None:
    """`python bench/run_all.py --quick --out DIR` completes (within 5 minutes) and writes JSON + markdown."""
    out = tmp_path / "docs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SAMORA_SHARED_DATA": str(shared_data)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in RESULTS:
        path = out / "results" / name
        assert path.is_file(), f"{path} missing"
        json.loads(path.read_text())
    report = out / "benchmarks.md"
    assert report.is_file()
    assert report.read_text().startswith("# SAMora benchmarks")

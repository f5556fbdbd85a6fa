"""The real-CT active-learning benchmark: its pool never touches the test slabs, and its quick run acquires by the
app's uncertainty score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from active_ct import pool_studies  # noqa: E402
from fewshot import split_slabs  # noqa: E402


def test_pool_studies_cover_the_training_slices_in_short_consecutive_runs():
    split = split_slabs(112)
    studies = pool_studies(split.train)
    flat = [z for study in studies for z in study]
    assert sorted(flat) == sorted(split.train)  # every training slice once, nothing else
    assert not set(flat) & (set(split.test) | set(split.guard))
    assert all(1 <= len(study) <= 4 for study in studies)
    assert all(b - a == 1 for study in studies for a, b in zip(study, study[1:], strict=False))


def test_quick_run_labels_the_most_uncertain_study(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "docs"

    def run() -> tuple[str, dict]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "active_ct.py"), "--quick", "--out", str(out),
             "--work", str(tmp_path / "work"), "--workers", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "SAMORA_SHARED_DATA": str(shared_data)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout, json.loads((out / "results" / "active_ct.json").read_text())

    _, record = run()
    by_strategy = {t["strategy"]: t for t in record["trajectories"]}
    assert set(by_strategy) == {"uncertainty", "random"}
    for trajectory in by_strategy.values():
        assert [r["labeled"] for r in trajectory["rounds"]] == [1, 2]
        assert 0.0 <= trajectory["rounds"][-1]["test_dice"] <= 1.0
    first = by_strategy["uncertainty"]["rounds"][0]
    assert first["studies"] == by_strategy["random"]["rounds"][0]["studies"]  # the same start for both
    entropy = first["entropy"]
    most_uncertain = max(entropy, key=entropy.get)
    assert first["picked"] == record["settings"]["pool"][int(most_uncertain)]
    assert (out / "active_ct.png").is_file()
    # a second run finds every job in the journal and reports the same trajectories without training again
    stdout, again = run()
    assert "(3 journalled)" in stdout
    assert again["trajectories"] == record["trajectories"]

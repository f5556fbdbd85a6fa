"""The headless sample-data demo (bench/demo_sample_data.py) meets its targets: mean Dice > 0.7 in < 900 s."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from app_helpers import run_demo_once

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """Folder of the session's single demo run (shared with the slow prompt test through the session temp)."""
    return run_demo_once(tmp_path_factory)


def test_demo_reaches_dice_target_in_time(demo_run):
    run = json.loads((demo_run / "run.json").read_text())
    log = (demo_run / "demo.log").read_text(errors="replace")[-3000:]
    assert run["returncode"] is not None, f"demo still running after {run['wall_s']:.0f}s:\n{log}"
    result = json.loads((demo_run / "result.json").read_text())
    assert "error" not in result, f"{result['error']}\n{log}"
    unlabeled = result["studies"]["unlabeled"]
    assert len(unlabeled) == 3 and len(result["studies"]["labeled"]) == 3
    assert set(result["per_study"]) == set(unlabeled)
    per_study = [s["mean_dice"] for s in result["per_study"].values()]
    assert all(0 <= d <= 1 for d in per_study)
    assert result["mean_dice"] == pytest.approx(sum(per_study) / len(per_study), abs=1e-3)
    assert all(s["model_version"] == 1 for s in result["per_study"].values())
    assert result["train_stats"]["samora"]["status"] == "DONE"
    assert result["train_stats"]["samora"]["train_mode"] == "cached"  # the default on a CPU machine
    # the first model version within 10 minutes of the server's launch, with the default (LiteMedSAM) conf
    assert result["first_version_s"] < 600, f"first version after {result['first_version_s']}s"
    for key in ("make_sample_data", "server_start", "finetune", "infer"):
        assert math.isfinite(result["phases_s"][key]) and result["phases_s"][key] >= 0, key
    assert result["machine"]["cpu_cores_usable"] and result["machine"]["torch"] and result["date"]
    print(json.dumps({k: result[k] for k in ("mean_dice", "total_s", "phases_s")}, indent=2))
    assert result["total_s"] < 900, f"demo took {result['total_s']}s"
    assert result["mean_dice"] > 0.7, f"demo mean Dice {result['mean_dice']:.3f} <= 0.7 (per study {per_study})"
    assert run["returncode"] == 0, log

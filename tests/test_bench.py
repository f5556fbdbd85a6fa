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


def test_ssl_heldout_trains_in_the_precision_asked_and_records_it(tmp_path: Path, shared_data: Path) -> None:
    """bench/ssl_heldout.py --precision bf16: the trainer gets bf16 (its expert file says so) and the record and table
    say so."""
    out = tmp_path / "ssl_heldout.json"
    args = ["--levels", "pixel", "--steps", "2", "--batch-size", "2", "--train-slices", "8", "--heldout-slices", "4"]
    proc = _run_bench("ssl_heldout.py", [*args, "--precision", "bf16", "--data", str(shared_data), "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["precision"] == "bf16" and record["train_slices"] == 8 and record["heldout_slices"] == 4
    (row,) = record["levels"]
    assert row["level"] == "pixel" and row["steps"] == 2 and row["heldout_step0"] > 0 and row["heldout_end"] > 0
    assert row["precision"] == "bf16"
    assert "bf16 training" in proc.stdout


def test_click_quality_scores_each_answer_to_a_click_and_records_it(tmp_path: Path, shared_data: Path) -> None:
    """bench/click_quality.py on one structure: three clicks, each answered three ways and scored; the served
    answer beats SAM's own answer to the click on the gallbladder of real CT, and two correction clicks raise it
    (when every click re-framed the boxes from scratch, they lowered it: 0.933 -> 0.554; adding the local answer at
    every failed edit left it at 0.933); so do two corrections of the truth's box. In 3D, the click spreads
    at the default click_spread_confidence (0.7; the model's confidence there is ~0.74) and not at 0.8."""
    out = tmp_path / "click_quality.json"
    args = ["--cases", "ct_abdomen_totalseg", "--structures", "gallbladder", "--spread-confidence", "0.8", "0.7"]
    args += ["--corrections", "2"]
    _run_bench("click_quality.py", [*args, "--data", str(shared_data), "--out", str(out)])
    record = json.loads(out.read_text())
    case = record["cases"]["ct_abdomen_totalseg"]
    assert case["summary"]["clicks"] == 3 and {r["structure"] for r in case["rows"]} == {"gallbladder"}
    for row in case["rows"]:
        assert all(0 <= row[kind]["dice"] <= 1 and row[kind]["decoder_s"] > 0 for kind in ("sam_points", "served"))
    summary = case["summary"]
    assert summary["served"]["mean_dice"] > summary["sam_points"]["mean_dice"] + 0.3
    assert all(len(row["corrections"]["dice"]) == 3 for row in case["rows"])
    after = summary["corrections"]["mean_dice_after_clicks"]
    assert after[0] == pytest.approx(summary["served"]["mean_dice"], abs=1e-3)  # the first click is the served one
    assert after[2] >= after[0] + 0.01
    from_box = summary["box_corrections"]["mean_dice_after_clicks"]
    assert from_box[0] == pytest.approx(summary["truth_box"]["mean_dice"], abs=1e-3)  # the drawn box's own answer
    assert from_box[2] >= from_box[0] + 0.01  # (the box alone or with the clicks as points: 0.909 -> 0.909)
    assert record["machine"]["cpu"] and "python bench/click_quality.py" in record["command"]
    (organ,) = case["rows_3d"]
    assert organ["0.7"]["slices"] > organ["0.8"]["slices"] == 1
    assert organ["0.7"]["dice_3d"] > organ["0.8"]["dice_3d"] + 0.3
    assert case["summary_3d"] == {"0.8": organ["0.8"]["dice_3d"], "0.7": organ["0.7"]["dice_3d"]}


def _run_bench(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run bench/<script> with args from the bench folder; it must succeed within 5 minutes."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc

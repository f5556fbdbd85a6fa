"""The real-weight summary that leads docs/benchmarks.md states each target as met or missed from the records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_summary  # noqa: E402

MACHINE = {"cpu": "test CPU", "cpu_cores_usable": 2, "gpu": "none"}


def _run(method: str, budget: float, seed: int, large: float) -> dict:
    return {"method": method, "budget": budget, "seed": seed, "large_mean_dice": large, "mean_dice": large - 0.05,
            "seconds": 60.0, "train_seconds": 50.0}  # fmt: skip


def _write(folder: Path, name: str, record: dict) -> None:
    (folder / name).write_text(json.dumps(record))


def _summary_of(folder: Path, runs: list[dict]) -> str:
    """The summary of a few-shot record at 10% holding `runs` (every method titled by its key)."""
    methods = {r["method"]: r["method"] for r in runs}
    few = {"settings": {"budgets": [0.1]}, "methods": methods, "runs": runs, "ssl_runs": [], "machine": MACHINE}
    _write(folder, "fewshot_litemedsam.json", few)
    return real_summary.render(folder)


def test_targets_are_judged_from_the_numbers(tmp_path: Path) -> None:
    runs = [_run("samora_cached", 0.1, s, 0.40 + 0.01 * s) for s in (0, 1)]
    runs += [_run("unet", 0.1, 0, 0.20), _run("samed", 0.1, 0, 0.39), _run("heads", 0.1, 0, 0.35)]
    text = _summary_of(tmp_path, runs)
    assert "| samora_cached | 0.405 ± 0.005 / 0.355 (2 seeds) |" in text
    assert (
        "Against `unet` (0.200, seeds [0]): +0.205" in text
        and "seeds [0]: +0.200 (+0.200); target >= +0.15: **met**" in text
    )
    assert (
        "Against `samed` (0.390, seeds [0]): +0.015 large-organ mean Dice against our mean of seeds [0, 1]; paired on "
        "the shared seeds [0]: +0.010 (+0.010); target >= +0.03: **missed**" in text
    )

    pair = {"reference": "samed", "ssl_method": "samora_cached", "total_epochs": 10.0, "target_dice": 0.3,
            "ssl_epochs_to_target": 4.0}  # fmt: skip
    _write(tmp_path, "efficiency_litemedsam.json", {"analysis": {"pairs": [pair]}})
    assert "after 4.0 of 10.0 epochs (40%; target <= 30%: **missed**)" in real_summary.render(tmp_path)


def test_rows_with_different_seeds_are_judged_on_the_seeds_they_share(tmp_path: Path) -> None:
    """Three seeds whose mean passes a one-seed reference by the target, while the shared seed does not: missed."""
    runs = [_run("samora_cached", 0.1, s, large) for s, large in ((0, 0.37), (1, 0.49), (2, 0.52))]
    runs += [
        _run("samed", 0.1, 0, 0.41),
        _run("unet", 0.1, 0, 0.2),
        _run("unet", 0.1, 1, 0.2),
        _run("unet", 0.1, 2, 0.2),
    ]
    text = _summary_of(tmp_path, runs)
    assert "Against `unet` (0.200): +0.260 large-organ mean Dice; target >= +0.15: **met**" in text
    assert "+0.050 large-organ mean Dice against our mean of seeds [0, 1, 2]" in text
    assert "paired on the shared seeds [0]: -0.040 (-0.040); target >= +0.03: **missed**" in text
    samed_elsewhere = [r for r in runs if r["method"] != "samed"] + [_run("samed", 0.1, 5, 0.3)]
    assert "no seed in common, so the target (>= +0.03) is **not judged**" in _summary_of(tmp_path, samed_elsewhere)


def test_nothing_to_say_without_the_real_weight_record(tmp_path: Path) -> None:
    assert real_summary.render(tmp_path) == ""


def test_the_bf16_full_stage_row_counts_as_samora_and_samed_is_judged_in_both_precisions(tmp_path: Path) -> None:
    runs = [_run("samora_cached", 0.1, 0, 0.37), _run("samora_bf16", 0.1, 0, 0.45)]
    runs += [_run("samed", 0.1, 0, 0.42), _run("samed_bf16", 0.1, 0, 0.40), _run("unet", 0.1, 0, 0.20)]
    text = _summary_of(tmp_path, runs)
    assert "SAMora's better mode at 10% of the labelled slices is `samora_bf16` (0.450, 1 seed(s))" in text
    assert "Against `samed` (0.420): +0.030 large-organ mean Dice; target >= +0.03: **met**" in text
    assert "Against `samed_bf16` (0.400): +0.050 large-organ mean Dice; target >= +0.03: **met**" in text


def test_the_cpu_cost_is_a_lower_bound_from_the_measured_jobs_and_names_what_never_ran() -> None:
    heads = [{**_run("heads", 0.05, 0, 0.3), "seconds": 150.0, "train_seconds": 100.0},
             {**_run("heads", 0.1, 0, 0.3), "seconds": 300.0, "train_seconds": 300.0}]  # fmt: skip
    ssl = [{"key": "ssl/0", "seed": 0, "seconds": 1000.0}, {"key": "ssl/0/bf16", "seed": 0, "seconds": 500.0}]
    few = {"runs": heads, "ssl_runs": ssl}
    seconds, unmeasured = real_summary.default_set_seconds(few)
    # 50 s of preparation once; SSL 3 seeds x (1000 fp32 + 500 bf16); heads 3 seeds x 3 budgets x its shortest 100 s
    assert seconds == 50 + 3 * 1500 + 9 * 100
    assert "heads" not in unmeasured and {"unet", "samed", "zeroshot", "hsam_ssl_bf16"} <= set(unmeasured)
    (line,) = real_summary.cpu_cost_answers(few)
    assert "took 0.5 h of machine time" in line and "at least 1.5 h here" in line and "**missed**" in line


def test_the_machine_line_says_whether_the_cpu_computes_bf16(tmp_path: Path) -> None:
    import report

    new = MACHINE | {"cpu_capability": "AVX2", "cpu_bf16_native": False}
    assert report.cpu_text(new) == "test CPU [AVX2, bf16 emulated]"
    assert report.cpu_text(new | {"cpu_capability": "AVX512", "cpu_bf16_native": True}).endswith("native bf16]")
    assert report.cpu_text(MACHINE) == "test CPU"  # a record from before the ISA was kept
    few = {"settings": {"budgets": [0.1]}, "methods": {}, "runs": [], "ssl_runs": [], "machine": new}
    _write(tmp_path, "fewshot_litemedsam.json", few)
    assert "(machine: test CPU [AVX2, bf16 emulated], 2 usable cores" in real_summary.render(tmp_path)

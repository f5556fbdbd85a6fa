"""The benchmarks' job runner: dependencies, and the journal that lets an interrupted run resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from jobs import Job, JobJournal, run_jobs  # noqa: E402

CALLS: list[str] = []


def _square(x: int) -> dict:
    CALLS.append(f"square/{x}")
    return {"value": x * x, "score": float("nan") if x == 0 else 1.0 / x}


def _jobs() -> list[Job]:
    return [Job(f"square/{x}", _square, {"x": x}, after=("square/0",) if x else ()) for x in range(3)]


def test_a_resumed_run_skips_the_journaled_jobs_and_returns_their_results(tmp_path):
    CALLS.clear()
    journal = JobJournal(tmp_path / "jobs.jsonl", {"steps": 300})
    first = run_jobs(_jobs()[:2], 1, 1, lambda job, result: journal.record(job.key, result))
    assert CALLS == ["square/0", "square/1"] and first["square/1"]["value"] == 1
    with journal.path.open("a") as out:
        out.write('{"tag": "' + journal.tag + '", "key": "square/2", "res')  # a kill in the middle of a line
    done = JobJournal(tmp_path / "jobs.jsonl", {"steps": 300}).finished()
    assert sorted(done) == ["square/0", "square/1"] and done["square/0"]["score"] is None  # NaN stored as null
    CALLS.clear()
    resumed = run_jobs(_jobs(), 1, 1, done=done)
    assert CALLS == ["square/2"] and sorted(resumed) == ["square/0", "square/1", "square/2"]
    assert resumed["square/2"]["value"] == 4


def test_other_settings_or_a_fresh_start_forget_the_journal(tmp_path):
    journal = JobJournal(tmp_path / "jobs.jsonl", {"steps": 300})
    journal.record("square/0", {"value": 0})
    assert JobJournal(tmp_path / "jobs.jsonl", {"steps": 301}).finished() == {}
    journal.clear()
    assert journal.finished() == {}


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="unique"):
        run_jobs(_jobs() + _jobs()[:1], 1, 1)


def test_a_journaled_ssl_job_runs_again_where_its_experts_are_missing_and_still_needed(tmp_path):
    from ssl_runs import without_missing_experts  # imports samora (torch) when called: loaded only here

    here, gone = tmp_path / "seed0", tmp_path / "seed0_bf16"
    here.mkdir()
    (here / "pretrain_summary.json").write_text("{}")
    folders = {"ssl/0": str(here), "ssl/0/bf16": str(gone), "ssl/1/bf16": str(tmp_path / "seed1_bf16")}
    done = {"ssl/0": {}, "ssl/0/bf16": {}, "ssl/1/bf16": {}, "hsam/0.1/1": {}}
    jobs = [Job(k, _square, {"x": 0}) for k in folders]
    jobs += [Job("samora/0.1/0", _square, {"x": 0}, after=("ssl/0", "ssl/0/bf16"))]
    jobs += [Job("hsam/0.1/1", _square, {"x": 0}, after=("ssl/1/bf16",))]
    kept = without_missing_experts(done, jobs, folders)
    # ssl/0 is on disk; ssl/0/bf16 is missing and samora still waits for it; ssl/1/bf16 is missing, but its only
    # dependant is done, so it is not trained again for nothing
    assert sorted(kept) == ["hsam/0.1/1", "ssl/0", "ssl/1/bf16"]
    assert "ssl/0/bf16" in done  # the caller's record of finished jobs is left alone


def test_the_decode_benchmark_gives_the_same_labels_at_every_decode_batch(shared_data, tmp_path):
    import json

    import autoseg_decode  # a bench module that imports torch: loaded only here

    out = tmp_path / "decode.json"
    volume = shared_data / "ct_abdomen_totalseg" / "image.nii.gz"
    args = ["--volume", str(volume), "--batches", "1", "4", "--repeats", "1", "--out", str(out)]
    assert autoseg_decode.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["seconds"][0] > 0 for r in rows)
    assert rows[0]["labels_checksum"] == rows[1]["labels_checksum"] > 0


def test_full_stage_seeds_runs_the_cpu_budget_at_every_seed_and_keeps_the_cpu_curve_budget():
    import fewshot

    base = {**fewshot.REAL, "full_stage": "seeds", "methods": ["hsam_ssl_bf16", "heads"], "seeds": [1, 2]}
    keys = {job.key for job in fewshot.fewshot_jobs(base, settings={})}
    budget = fewshot.FULL_STAGE_CPU[0]
    assert {k for k in keys if k.startswith("hsam_ssl_bf16/")} == {
        f"hsam_ssl_bf16/{budget}/1",
        f"hsam_ssl_bf16/{budget}/2",
    }
    assert {k for k in keys if k.startswith("heads/")} == {f"heads/{b}/{s}" for b in base["budgets"] for s in (1, 2)}
    # same held-out curve budget as the CPU default, so these jobs join the record's journal (same settings tag)
    assert [fewshot.curve_budgets(mode) for mode in ("cpu", "seeds", "all")] == [[budget], [budget], [1.0]]

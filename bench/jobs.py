"""Running a benchmark's jobs: a small process-pool scheduler with dependencies, per-job peak memory, and a journal
that lets an interrupted run resume where it stopped (a real-weight benchmark takes hours on a CPU).

Every benchmark runs its jobs in `--workers` processes with `--threads` torch threads each (default 2 x 1 on a
2-core machine): small models use cores better as separate processes than as intra-op threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from records import json_safe


@dataclass
class Job:
    """One unit of work: `fn(**kwargs)` returning a JSON-able dict, run after the jobs named in `after`."""

    key: str
    fn: Callable[..., dict]
    kwargs: dict[str, Any]
    after: tuple[str, ...] = ()
    cost: float = 1.0  # larger first among the ready jobs


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS count (Linux: writing 5 to clear_refs resets VmHWM), so a worker that runs
    several jobs reports each job's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the worker's earlier jobs too


def peak_rss_mb() -> float:
    """Peak resident set size (MB) since the last reset_peak_rss (VmHWM), or of the whole process elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def init_worker(threads: int) -> None:
    """Per-process settings: torch threads, quiet logs and warnings."""
    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (in-process runs)
    warnings.filterwarnings("ignore")
    logging.getLogger("samora").setLevel(logging.WARNING)
    logging.getLogger("monai").setLevel(logging.ERROR)


def run_jobs(
    jobs: Sequence[Job],
    workers: int,
    threads: int,
    on_result: Callable[[Job, dict], None] | None = None,
    done: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Run jobs respecting `after`, at most `workers` at a time (spawned processes; in-process when workers=1).
    Jobs whose key is in `done` (results of an earlier, interrupted run) are not run again; their results are
    returned with the new ones."""
    if len({j.key for j in jobs}) != len(jobs):
        raise ValueError("job keys must be unique")
    results: dict[str, dict] = dict(done or {})
    pending = {j.key: j for j in jobs if j.key not in results}

    def ready() -> list[Job]:
        return sorted((j for j in pending.values() if all(a in results for a in j.after)), key=lambda j: -j.cost)

    if workers <= 1:
        init_worker(threads)
        while pending:
            candidates = ready()
            if not candidates:
                raise RuntimeError(f"unsatisfiable job dependencies: {sorted(pending)}")
            job = candidates[0]
            del pending[job.key]
            results[job.key] = job.fn(**job.kwargs)
            if on_result is not None:
                on_result(job, results[job.key])
        return results
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(threads,)) as pool:
        running: dict[Any, Job] = {}
        while pending or running:
            for job in ready():
                if len(running) >= workers:
                    break
                del pending[job.key]
                running[pool.submit(job.fn, **job.kwargs)] = job
            if not running:
                raise RuntimeError(f"unsatisfiable job dependencies: {sorted(pending)}")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                results[job.key] = future.result()
                if on_result is not None:
                    on_result(job, results[job.key])
    return results


class JobJournal:
    """Results of finished jobs, one JSON line each, tagged with a hash of the run's settings: a later run with the
    same settings reads them back and skips those jobs; a run with other settings ignores them."""

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.tag = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def finished(self) -> dict[str, dict]:
        """The results recorded under this run's settings (a truncated last line, from a kill, is skipped)."""
        results: dict[str, dict] = {}
        if not self.path.exists():
            return results
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("tag") == self.tag:
                results[entry["key"]] = entry["result"]
        return results

    def record(self, key: str, result: dict) -> None:
        """Append one job's result (flushed at once, so a kill loses at most the job that was running)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(json_safe({"tag": self.tag, "key": key, "result": result})) + "\n")
            out.flush()

    def clear(self) -> None:
        """Forget every recorded result (a fresh run)."""
        self.path.unlink(missing_ok=True)


def open_journal(
    path: str | Path, settings: dict[str, Any], jobs: Sequence[Job], *, fresh: bool
) -> tuple[JobJournal, dict[str, dict]]:
    """The run's journal (emptied first on a fresh run) and the results it already holds for `jobs`."""
    journal = JobJournal(path, settings)
    if fresh:
        journal.clear()
    keys = {j.key for j in jobs}
    return journal, {k: v for k, v in journal.finished().items() if k in keys}

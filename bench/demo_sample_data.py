"""Headless run of the README's main job on the sample data, through a real MONAI Label server.

    python bench/demo_sample_data.py [--out docs/demo_sample_data.json] [--work DIR] [--conf KEY VALUE]...

1. `samora make-sample-data`: 3 labelled + 3 unlabelled synthetic abdominal CT phantoms (default shape).
2. `monailabel start_server --app apps/samora --studies <sample data>` with the app's default conf (only
   `model_dir` points into the work folder). With the default `bootstrap auto` the app queues the samora_ssl
   bootstrap (unlabelled studies, no experts yet) and then samora fine-tuning (final labels, no model version):
   the demo waits for both through MONAI Label's REST API, as 3D Slicer would.
3. Infers `samora` on every unlabelled phantom via `MONAILabelClient` and scores it against the ground truth
   (kept outside the datastore) with `samora.metrics.mean_dice`.

Prints and writes (JSON) per-study and mean Dice, phase timings, the command, machine and date. Exit status: 0 when
mean Dice > 0.7, 1 when below, 2 on a failure (server, training, timeout).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samora.server_process import APP_DIR, ServerProcess, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
TARGET_DICE = 0.7
# The app queues the first fine-tuning before the SSL bootstrap; the demo needs the first model version only
# (the bootstrap through a real encoder runs on afterwards and is reported as far as it got).
TRAINERS = ("samora",)
FIRST_VERSION_TARGET_S = 600  # from the server's launch to the first published model version


class DemoError(RuntimeError):
    """The job could not run to the end; the message says where."""


def _get_json(server: ServerProcess, selector: str) -> Any:
    """A JSON endpoint's answer, or None on a non-200 answer."""
    status, body = server.get(selector)
    return body if status == 200 else None


def _wait_for_trainers(server: ServerProcess, budget: float, log, trainers=TRAINERS) -> dict[str, dict]:
    """Poll /train/?all=true until `trainers` (queued by the app at start) have finished."""
    start = time.monotonic()
    deadline = start + budget
    finished: dict[str, dict] = {}
    seen_running: dict[str, float] = {}
    last_line, last_report = "", 0.0
    while True:
        tasks = _get_json(server, "/train/?all=true") or []
        by_model = {t["request"].get("model"): t for t in tasks if isinstance(t, dict) and t.get("request")}
        now = time.monotonic()
        for model in trainers:
            task = by_model.get(model)
            if task is None:
                continue
            if task.get("status") == "RUNNING":
                seen_running.setdefault(model, now)
            if task.get("status") in ("DONE", "ERROR", "STOPPED") and model not in finished:
                finished[model] = {**task, "observed_done": now}
                if task["status"] != "DONE":
                    details = "\n".join(task.get("details") or [])
                    raise DemoError(f"{model} training ended {task['status']}:\n{details}")
                log(f"  {model} done")
        if all(m in finished for m in trainers):
            for model in trainers:
                finished[model]["observed_running"] = seen_running.get(model)
            return finished
        if now - last_report >= 15:
            stats = (_get_json(server, "/info/") or {}).get("train_stats", {})
            line = ", ".join(
                f"{m} {st.get('epoch')}/{st.get('total_epochs')}"
                for m, st in stats.items()
                if st.get("status") == "RUNNING"
            )
            if line and line != last_line:
                log(f"  training: {line}")
                last_line, last_report = line, now
        if not tasks and now > start + 60:
            raise DemoError("the server queued no training within 60 s: is `bootstrap` off or the model dir not new?")
        if now > deadline:
            raise DemoError(f"training not finished within {budget:.0f}s (done: {sorted(finished)})")
        time.sleep(2.0)


def _machine() -> dict[str, Any]:
    """The benchmarks' machine record (one worker, torch's default threads) and the load when the demo started."""
    import torch
    from records import machine_info

    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {**machine_info(1, torch.get_num_threads()), "load_average_at_start": load}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "demo_sample_data.json"), help="JSON result")
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the temp work folder")
    parser.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="extra app conf (the demo's point is the defaults: use only to explore)",
    )
    parser.add_argument("--budget", type=float, default=900.0, help="seconds for the whole job before giving up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--after-bootstrap",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then wait up to SECONDS for the SSL bootstrap the app queued and the version it publishes, and score "
        "the unlabelled studies again with that version (0: stop after the first version, the demo's point)",
    )
    return parser.parse_args(argv)


class _Clock:
    """The job's time line: log lines stamped with the seconds since the start, and the duration of each phase."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.phases: dict[str, float] = {}

    def log(self, msg: str) -> None:
        """Print `msg` after the seconds since the start."""
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def phase(self, name: str, since: float) -> float:
        """Record phase `name` as lasting from `since` until now; returns now (the next phase's start)."""
        now = time.monotonic()
        self.phases[name] = round(now - since, 1)
        return now

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.t0


def _import_job_modules() -> None:
    """Import what the job uses before its clock starts (nibabel, numpy, samora's CLI, data and metrics: torch,
    MONAI), so that no phase's time includes an import."""
    import nibabel  # noqa: F401
    import numpy  # noqa: F401

    import samora.cli  # noqa: F401
    import samora.data  # noqa: F401
    import samora.metrics  # noqa: F401


def _fresh_work_dir(work: str | None) -> Path:
    """The given work folder (it must be new or empty), or a new temp folder."""
    path = Path(work or tempfile.mkdtemp(prefix="samora-demo-")).resolve()
    if path.is_dir() and any(path.iterdir()):
        # a model version left there would be served instead of training: the demo measures a fresh start
        raise SystemExit(f"--work {path} is not empty: give a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _app_conf(work: Path, extra: list[list[str]]) -> dict[str, str]:
    """The app's conf: the model folder inside the work folder, the phantoms' labels, then any --conf pairs."""
    from samora.data import PHANTOM_LABELS

    # the phantoms' own label map, as scripts/serve.sh serves them (the app's default is 8 abdominal organs)
    phantom_labels = ",".join(f"{name}={idx}" for name, idx in PHANTOM_LABELS.items())
    return {"model_dir": str(work / "model"), "labels": phantom_labels, **{k: v for k, v in extra}}


def _new_record(work: Path, *, conf: dict[str, str], started: dt.datetime, phases: dict[str, float]) -> dict[str, Any]:
    """The result record before the job runs: command, date, machine, work folder, conf, target, phase timings."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "work": str(work),
        "conf": conf,
        "target_mean_dice": TARGET_DICE,
        "phases_s": phases,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job; returns the result record (also on failure, with `error`)."""
    _import_job_modules()
    clock = _Clock()
    started = dt.datetime.now(dt.timezone.utc)
    temp = args.work is None
    work = _fresh_work_dir(args.work)
    studies, truth = work / "sample-data", work / "sample-data_truth"
    conf = _app_conf(work, args.conf)
    record = _new_record(work, conf=conf, started=started, phases=clock.phases)
    server: ServerProcess | None = None
    try:
        t, unlabeled = _make_sample_data(studies, truth=truth, seed=args.seed, record=record, clock=clock)
        server = _start_demo_server(studies, conf=conf, work=work, clock=clock)
        t_up = _describe_server(server, record=record, clock=clock, since=t)
        _wait_for_first_version(server, total_budget=args.budget, record=record, clock=clock, t_up=t_up)
        _infer_unlabeled(server, unlabeled, truth=truth, record=record, clock=clock)
        if args.after_bootstrap:
            _after_bootstrap(server, unlabeled, truth=truth, budget=args.after_bootstrap, record=record, clock=clock)
    except Exception as e:  # noqa: BLE001 - any failure ends up in the JSON and the exit status
        record["error"] = f"{type(e).__name__}: {e}"
        clock.log(f"FAILED: {record['error']}")
    finally:
        if server is not None:
            t = time.monotonic()
            stop_server(server)
            clock.phase("server_stop", t)
        record["total_s"] = round(clock.elapsed(), 1)
        if temp and not args.keep and "error" not in record:
            shutil.rmtree(work, ignore_errors=True)
    return record


def _make_sample_data(
    studies: Path, *, truth: Path, seed: int, record: dict[str, Any], clock: _Clock
) -> tuple[float, list[str]]:
    """`samora make-sample-data` into `studies` (ground truth of the unlabelled ones in `truth`); records the study
    ids and returns the end of the phase and the unlabelled ids."""
    from samora.cli import main as samora_cli

    clock.log(f"sample data -> {studies}")
    t = time.monotonic()
    if samora_cli(["make-sample-data", "--out", str(studies), "--truth", str(truth), "--seed", str(seed)]):
        raise DemoError("make-sample-data failed")
    t = clock.phase("make_sample_data", t)
    labeled = sorted(p.name[: -len(".nii.gz")] for p in (studies / "labels" / "final").glob("*.nii.gz"))
    unlabeled = sorted(p.name[: -len(".nii.gz")] for p in truth.glob("*.nii.gz"))
    record["studies"] = {"labeled": labeled, "unlabeled": unlabeled}
    return t, unlabeled


def _start_demo_server(studies: Path, *, conf: dict[str, str], work: Path, clock: _Clock) -> ServerProcess:
    """`monailabel start_server` on the sample data with MONAI Label's own defaults (sessions in the work folder)."""
    # MONAI Label's own defaults (the test launcher's quieter settings are not the demo's point)
    env = {**os.environ, "MONAILABEL_PYEXE": sys.executable, "PYTHONUNBUFFERED": "1"}
    env["MONAI_LABEL_SESSION_PATH"] = str(work / "sessions")
    clock.log(f"starting monailabel start_server --app {APP_DIR} --studies {studies}")
    return start_server(studies=studies, conf=conf, work=work, timeout=180, env=env)


def _describe_server(server: ServerProcess, *, record: dict[str, Any], clock: _Clock, since: float) -> float:
    """Record the server's command, version and trainers; the server_start phase ends here (returned)."""
    record["server_command"] = " ".join(server.proc.args)
    t_up = clock.phase("server_start", since)
    info = server.client.info()
    record["server_info"] = {"version": info.get("version"), "trainers": list(info["trainers"])}
    return t_up


def _wait_for_first_version(
    server: ServerProcess, *, total_budget: float, record: dict[str, Any], clock: _Clock, t_up: float
) -> None:
    """Wait for the fine-tuning the app queued at start (within what is left of `total_budget`, less a minute for
    inference); record when the first model version was published."""
    clock.log("waiting for the first model version (samora fine-tuning, queued by the app at start)")
    budget = total_budget - clock.elapsed() - 60
    tasks = _wait_for_trainers(server, budget, clock.log)
    clock.phases["finetune"] = round(tasks["samora"]["observed_done"] - t_up, 1)
    record["first_version_s"] = round(tasks["samora"]["observed_done"] - server.launched, 1)
    record["first_version_target_s"] = FIRST_VERSION_TARGET_S
    clock.log(f"first model version {record['first_version_s']:.0f}s after the server's launch")
    record["train_stats"] = server.client.info()["train_stats"]


def _infer_unlabeled(
    server: ServerProcess, unlabeled: list[str], *, truth: Path, record: dict[str, Any], clock: _Clock
) -> None:
    """Infer `samora` on every unlabelled study and score it; records per-study and mean Dice (model version 1)."""
    t = time.monotonic()
    per_study, mean = _score_studies(server, unlabeled, truth=truth, log=clock.log)
    clock.phase("infer", t)
    record["per_study"], record["mean_dice"] = per_study, mean
    versions = {s["model_version"] for s in per_study.values()}
    if versions != {1}:
        raise DemoError(f"inference used model version(s) {versions}, expected the freshly trained 1")


def _after_bootstrap(
    server: ServerProcess, unlabeled: list[str], *, truth: Path, budget: float, record: dict[str, Any], clock: _Clock
) -> None:
    """Wait for the SSL bootstrap the app queued after the first version (it publishes a version trained with its
    experts where they act), then score the unlabelled studies again; recorded under `after_bootstrap`."""
    clock.log("waiting for the SSL bootstrap (samora_ssl) and the version it publishes")
    t = time.monotonic()
    tasks = _wait_for_trainers(server, budget, clock.log, trainers=("samora_ssl",))
    clock.phase("bootstrap", t)
    task = tasks["samora_ssl"]
    stats = server.client.info()["train_stats"]
    per_study, mean = _score_studies(server, unlabeled, truth=truth, log=clock.log)
    clock.phase("infer_after_bootstrap", task["observed_done"])
    record["after_bootstrap"] = {
        "bootstrap_task_s": round(task["observed_done"] - (task["observed_running"] or t), 1),
        "train_stats": {k: stats.get(k) for k in ("samora_ssl", "samora")},
        "per_study": per_study,
        "mean_dice": mean,
        "model_versions": sorted({s["model_version"] for s in per_study.values()}),
    }
    clock.log(f"after the bootstrap: mean Dice {record['after_bootstrap']['mean_dice']:.4f} (first version "
              f"{record['mean_dice']:.4f})")  # fmt: skip


def _score_studies(
    server: ServerProcess, image_ids: list[str], *, truth: Path, log: Callable[[str], None]
) -> tuple[dict[str, dict], float]:
    """Each study's scores (_score_study) and their mean Dice."""
    import numpy as np

    per_study = {i: _score_study(server, image_id=i, truth=truth, log=log) for i in image_ids}
    return per_study, round(float(np.mean([s["mean_dice"] for s in per_study.values()])), 4)


def _score_study(server: ServerProcess, *, image_id: str, truth: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Infer one study through the server and score it against its ground truth: mean and per-organ Dice (logged)."""
    import nibabel as nib
    import numpy as np

    from samora.data import PHANTOM_LABELS
    from samora.metrics import mean_dice, volume_metrics

    t_inf = time.monotonic()
    path, result = server.client.infer("samora", image_id, {})
    if path is None:
        raise DemoError(f"infer returned no label for {image_id}: {result}")
    pred = np.asarray(nib.load(path).dataobj).astype(np.int16)
    gt = np.asarray(nib.load(str(truth / f"{image_id}.nii.gz")).dataobj).astype(np.int16)
    if pred.shape != gt.shape:
        raise DemoError(f"{image_id}: prediction shape {pred.shape} != truth {gt.shape}")
    dice = mean_dice(pred, gt, PHANTOM_LABELS)
    classes = volume_metrics(pred, gt, PHANTOM_LABELS)["classes"]
    scores = {
        "mean_dice": round(dice, 4),
        "dice": {name: round(m["dice"], 4) for name, m in classes.items()},
        "model_version": result.get("model_version"),
        "infer_s": round(time.monotonic() - t_inf, 2),
    }
    log(f"  {image_id}: mean Dice {dice:.4f} " + " ".join(f"{k} {v:.3f}" for k, v in scores["dice"].items()))
    return scores


def main(argv: list[str] | None = None) -> int:
    """Run, print a summary, write the JSON; exit 0 only if mean Dice > 0.7."""
    args = _parse(argv)
    record = run(args)
    dice = record.get("mean_dice", math.nan)
    record["passed"] = "error" not in record and dice > TARGET_DICE
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    m = record["machine"]
    print(f"\n{record['date']}  {m['platform']}  {m['cpu_cores_usable']} usable cores  torch {m['torch']}")
    print(f"command: {record['command']}")
    print(
        "phases (s): " + ", ".join(f"{k} {v}" for k, v in record["phases_s"].items()) + f"; total {record['total_s']}"
    )
    print(f"mean Dice over {len(record.get('per_study', {}))} unlabelled phantoms: {dice:.4f} (target > {TARGET_DICE})")
    print(f"result: {out}")
    if "error" in record:
        return 2
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

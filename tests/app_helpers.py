"""Helpers for the app tests: a small phantom datastore and MONAI Label settings pointing at it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from samora.data import PHANTOM_LABELS, write_phantom_studies
from samora.server_process import (  # noqa: F401 - re-exported for the tests
    APP_DIR,
    ServerProcess,
    alive,
    free_port,
    monailabel_env,
    start_server,
    stop_server,
)

ROOT = Path(__file__).resolve().parents[1]


def make_datastore(tmp: Path, n_labeled: int = 2, n_unlabeled: int = 2, shape=(64, 64, 24)) -> dict:
    """Phantom studies in tmp/studies (labels/final for the labelled ones), truth of the rest in tmp/truth."""
    info = write_phantom_studies(
        tmp / "studies", n_labeled=n_labeled, n_unlabeled=n_unlabeled, seed=3, shape=shape, truth_dir=tmp / "truth"
    )
    return {**info, "studies": tmp / "studies", "truth": tmp / "truth"}


def app_conf(tmp: Path, **overrides) -> dict[str, str]:
    """Small, fast app configuration (strings, as MONAI Label passes them)."""
    conf = {
        "preset": "tiny",
        "image_size": "64",
        # compact: the `monailabel` launcher script word-splits its arguments ($*), so no spaces in values
        "labels": json.dumps(PHANTOM_LABELS, separators=(",", ":")),
        "epochs": "2",
        "batch_size": "8",
        "ssl_steps": "4",
        "ssl_batch_size": "4",
        "bootstrap": "off",
        "train_every": "0",
        "model_dir": str(tmp / "model"),
        "infer_batch_size": "8",
        # fixed, not probed: a timing-dependent choice would make outputs differ between two app starts
        "encoder_path": "fp32",
    }
    conf.update({k: str(v) for k, v in overrides.items()})
    return conf


def shuffled_slicer_label(truth_path: Path, out_path: Path, order: list[str]) -> list[dict]:
    """Re-number a label volume in the viewer's segment order; returns Slicer-style label_info."""
    img = nib.load(str(truth_path))
    data = np.asarray(img.dataobj).astype(np.int16)
    out = np.zeros_like(data)
    info = []
    for viewer_idx, name in enumerate(order, start=1):
        out[data == PHANTOM_LABELS[name]] = viewer_idx
        info.append({"name": name, "idx": viewer_idx})
    nib.save(nib.Nifti1Image(out, img.affine), str(out_path))
    return info


# ----------------------------------------------------------------------------------------------------------------
# a real `monailabel start_server` subprocess: samora.server_process (shared with the demo benchmark)


def wait_for(poll: Callable[[], Any], done: Callable[[Any], bool], timeout: float, interval: float = 2.0) -> Any:
    """Call poll() until done(result) or timeout (TimeoutError carrying the last result)."""
    deadline = time.monotonic() + timeout
    while True:
        result = poll()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout:.0f}s; last: {result!r}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------------------------
# the sample-data demo, run once per pytest session (test_demo and the slow prompt test share its trained model)

DEMO_SCRIPT = ROOT / "bench" / "demo_sample_data.py"
DEMO_TIMEOUT = 1500  # seconds: generous over the demo's own 900 s target on 2 contended cores


def run_demo_once(tmp_path_factory) -> Path:
    """Run bench/demo_sample_data.py in a subprocess (once per session); returns its folder.

    The folder holds result.json (the demo's JSON), run.json (exit status, wall time) and demo.log; the demo's
    work folder (sample data, truth, model) is kept inside it.
    """
    folder = tmp_path_factory.getbasetemp() / "demo_sample_data"
    run_file = folder / "run.json"
    if run_file.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(DEMO_SCRIPT), "--work", str(folder / "work"), "--out", str(folder / "result.json")]
    start = time.monotonic()
    with open(folder / "demo.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
        try:
            returncode = proc.wait(timeout=DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the demo and the server it started
            proc.wait()
            returncode = None
    run_file.write_text(json.dumps({"returncode": returncode, "wall_s": time.monotonic() - start, "cmd": cmd}))
    return folder

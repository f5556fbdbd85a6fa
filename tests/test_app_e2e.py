"""End to end: a real `monailabel start_server` subprocess driven only through MONAI Label's Python client.

The flow is the annotation loop of 3D Slicer/OHIF: /info, next sample, auto-segmentation, saving a final label in
the viewer's own segment order, training a new model version, scoring, and the uncertainty strategy. The server
runs in its own process group; teardown kills the group and asserts no process it started is left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import pytest
from app_helpers import (
    ServerProcess,
    alive,
    app_conf,
    make_datastore,
    shuffled_slicer_label,
    start_server,
    stop_server,
    wait_for,
)
from monailabel.client.client import MONAILabelClientException

pytestmark = pytest.mark.e2e

SCORE_KEY = "samora_uncertainty"
TASK_TIMEOUT = 240  # seconds for one train/scoring subprocess on 2 contended cores (typically 20-40 s)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The real server on a phantom datastore (2 labelled, 3 unlabelled studies of 64x64x24), tiny fast conf."""
    tmp = tmp_path_factory.mktemp("e2e")
    store = make_datastore(tmp, n_labeled=2, n_unlabeled=3)
    handle = start_server(store["studies"], app_conf(tmp, threads=1), tmp / "work")
    handle.store = store  # type: ignore[attr-defined]
    handle.tmp = tmp  # type: ignore[attr-defined]
    try:
        yield handle
    finally:
        left = stop_server(handle)
        assert handle.proc.poll() is not None, "the server process is still running"
        assert not left, f"processes left running after stopping the server: {sorted(left)}"


def _task_done(task: dict | None) -> bool:
    return bool(task) and task.get("status") in ("DONE", "ERROR", "STOPPED")


def _train_status(server: ServerProcess) -> dict | None:
    server.remember_children()
    try:
        return server.client.train_status()
    except MONAILabelClientException:  # 404 before the task is registered
        return None


def _scoring_status(server: ServerProcess) -> dict | None:
    server.remember_children()
    status, body = server.get("/scoring/")
    return body if status == 200 else None


def _infer_volume(server: ServerProcess, model: str, image: str, params: dict | None = None):
    path, result = server.client.infer(model, image, params or {})
    assert path is not None, f"infer {model} returned no label file (result {result})"
    img = nib.load(path)
    return img, np.asarray(img.dataobj), result


def test_info_lists_tasks_trainers_and_strategies(server):
    info = server.client.info()
    assert info["name"] == "SAMora"
    assert set(info["models"]) == {"samora", "samora_prompt"}
    assert info["models"]["samora"]["type"] == "segmentation"
    assert info["models"]["samora_prompt"]["type"] == "deepgrow"
    assert list(info["trainers"]) == ["samora", "samora_ssl"]
    assert SCORE_KEY in info["scoring"]
    assert {"uncertainty", "random", "first"} <= set(info["strategies"])
    assert info["labels"] == list(server.store["labels"])  # a list (OHIF calls .push on it), in our order


def test_next_sample_returns_an_unlabeled_study(server):
    for strategy in ("first", "random"):
        pick = server.client.next_sample(strategy, {})
        assert pick["id"] in server.store["unlabeled"], (strategy, pick)
        assert pick["path"].endswith(f"{pick['id']}.nii.gz")


def test_prompt_infer_over_http(server):
    image = server.store["unlabeled"][0]
    study = nib.load(str(server.store["studies"] / f"{image}.nii.gz"))
    params = {"label": "liver", "foreground": [[40, 32, 12]], "background": [], "roi": [], "slice": 12}
    img, mask, result = _infer_volume(server, "samora_prompt", image, params)
    assert mask.shape == study.shape
    assert set(np.unique(mask).tolist()) <= {0, 1}
    assert 12 in result["slices"] and result["label"] == "liver"
    # same clicks again: every slice embedding comes from the server's cache
    _, again, second = _infer_volume(server, "samora_prompt", image, params)
    assert second["encoded_slices"] == 0, second
    np.testing.assert_array_equal(mask, again)


def test_label_train_infer_score_select(server):
    client = server.client
    unlabeled = server.store["unlabeled"]
    image = unlabeled[0]
    study = nib.load(str(server.store["studies"] / f"{image}.nii.gz"))

    # 1. auto-segmentation before any training: refused with what to do (untrained class heads give no masks)
    with pytest.raises(MONAILabelClientException) as refused:
        client.infer("samora", image, {})
    assert "no trained model version" in str(refused.value), refused.value

    # 2. a final label from "3D Slicer": segments numbered in the viewer's order, names in label_info
    target = unlabeled[-1]
    order = ["spine", "kidney_right", "liver", "spleen", "kidney_left"]
    upload = server.tmp / "upload.nii.gz"
    label_info = shuffled_slicer_label(server.store["truth"] / f"{target}.nii.gz", upload, order)
    saved = client.save_label(target, str(upload), tag="final", params={"label_info": label_info})
    assert saved["image"] == target
    objects = client.datastore()["objects"]
    assert "final" in objects[target]["labels"]
    stored = objects[target]["labels"]["final"]["info"]
    assert [e["name"] for e in stored.get("label_info") or stored["params"]["label_info"]] == order
    assert client.next_sample("first", {})["id"] != target  # now labelled: not offered any more

    # 3. training through the queue: poll /train/ until the subprocess finishes, then a new version is served
    start = time.monotonic()
    task = client.train_start("samora", {"epochs": 2, "batch_size": 8})
    assert task["request"]["model"] == "samora"
    task = wait_for(lambda: _train_status(server), _task_done, TASK_TIMEOUT)
    assert task["status"] == "DONE", f"training ended {task['status']}: {list(task.get('details') or [])}"
    train_s = time.monotonic() - start
    stats = client.info()["train_stats"]["samora"]
    assert stats["status"] == "DONE" and stats["model_version"] == 1 and stats["base_version"] == 0, stats
    assert stats["epoch"] == 2 and stats["total_epochs"] == 2 and stats["labeled_studies"] == 3
    assert math.isfinite(stats["best_metric"])

    img1, labels1, result1 = _infer_volume(server, "samora", image)
    assert result1["model_version"] == 1
    assert labels1.shape == study.shape
    np.testing.assert_allclose(img1.affine, study.affine, atol=1e-4)
    # (2 epochs of a random tiny backbone may still answer all background: the version and grid are what is checked)
    assert set(np.unique(labels1).tolist()) <= {0, *server.store["labels"].values()}

    # 4. scoring in a subprocess; the scores land in the datastore with the model version they belong to
    start = time.monotonic()
    server.post(f"/scoring/{SCORE_KEY}")
    scoring = wait_for(lambda: _scoring_status(server), _task_done, TASK_TIMEOUT)
    assert scoring["status"] == "DONE", f"scoring ended {scoring['status']}: {list(scoring.get('details') or [])}"
    score_s = time.monotonic() - start

    # 5. the uncertainty strategy picks the argmax of the stored scores among the still-unlabelled studies
    pick = client.next_sample("uncertainty", {})
    objects = client.datastore()["objects"]
    remaining = sorted(i for i, o in objects.items() if "final" not in o["labels"])
    assert remaining == sorted(unlabeled[:-1])
    scores = {}
    for image_id in remaining:
        info = objects[image_id]["image"]["info"].get(SCORE_KEY)
        assert info is not None, f"{image_id} has no stored {SCORE_KEY} score: {objects[image_id]['image']['info']}"
        assert info["model_version"] == 1
        scores[image_id] = float(info["score"])
    assert all(math.isfinite(s) and s >= 0 for s in scores.values()), scores
    assert len(set(scores.values())) == len(scores), f"tied scores make the argmax check meaningless: {scores}"
    assert pick["id"] == max(scores, key=scores.get), (pick, scores)
    assert pick["score"] == pytest.approx(scores[pick["id"]])
    print(f"train {train_s:.1f}s, scoring {score_s:.1f}s, scores {scores}")


def _safe_running(server: ServerProcess) -> bool:
    try:
        return bool(server.client.train_status(check_if_running=True))
    except MONAILabelClientException:
        return False


def test_stop_kills_a_running_training_subprocess(server):
    """Runs last: stopping the server mid-training must take the training subprocess down with it."""
    server.client.train_start("samora", {"epochs": 500})
    children = wait_for(server.remember_children, lambda procs: bool(alive(procs)), 60, interval=0.5)
    running = [p for p in children if p.pid in alive(children)]
    assert running, "no training subprocess appeared"
    # under load the queued run may take a moment to register as running
    wait_for(lambda: _safe_running(server), bool, 60, interval=0.5)
    running = [p for p in server.remember_children() if p.pid in alive(server.remember_children())]
    left = stop_server(server)
    assert server.proc.poll() is not None
    assert not left, f"left running: {sorted(left)}"
    assert not alive(running), f"training subprocess(es) {sorted(alive(running))} survived the server"

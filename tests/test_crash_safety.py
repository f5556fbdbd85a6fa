"""A process killed (SIGKILL) while publishing models never leaves the store without a loadable current version;
a training that fails says why and leaves the previous version serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from samora.engine.store import ModelStore

PUBLISHER = textwrap.dedent(
    """
    import sys, torch
    from samora.config import ModelConfig
    from samora.engine.store import ModelStore
    from samora.model import SamoraModel
    torch.set_num_threads(1)
    store = ModelStore(sys.argv[1], keep=3)
    model = SamoraModel(ModelConfig(preset="tiny", image_size=64, labels={"liver": 1}))
    print("ready", flush=True)
    while True:
        with torch.no_grad():
            model.head.decoder.mask_tokens.weight.add_(0.01)
        store.publish(model)
    """
)


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_sigkill_during_publish_keeps_a_loadable_version(tmp_path, delay):
    root = tmp_path / "models"
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not (root / "current.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = ModelStore(root)
    loaded = store.load_current()
    assert loaded is not None, "no loadable version after the kill"
    version, model = loaded
    assert version == store.current_version() or version < store.current_version()
    assert version >= 1


@pytest.mark.e2e
def test_failed_training_reports_why_and_keeps_the_previous_version(tmp_path):
    from app_helpers import app_conf, make_datastore, start_server, stop_server, wait_for

    from samora.model import SamoraModel
    from samora.serving.settings import AppSettings

    store = make_datastore(tmp_path)
    conf = app_conf(tmp_path)
    ModelStore(conf["model_dir"]).publish(SamoraModel(AppSettings.from_conf(conf).model_config()))  # version 1
    broken = store["studies"] / "labels" / "final" / f"{store['labeled'][0]}.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # a label damaged on disk after it was accepted
    server = start_server(store["studies"], conf, tmp_path / "work")
    try:
        server.client.train_start("samora", {})
        status = wait_for(server.client.train_status, lambda s: s and s.get("status") in ("DONE", "ERROR"), 300)
        assert status["status"] == "ERROR", status
        assert f"{broken}: unreadable or corrupt file" in "\n".join(status["details"]), status["details"]
        assert f"training samora failed: VolumeError: {broken}" in server.log_tail(50_000)
        stats = server.client.info()["train_stats"]["samora"]
        assert stats["status"] == "ERROR" and str(broken) in stats["error"], stats
        _, result = server.client.infer("samora", store["unlabeled"][0], {})
        assert result["model_version"] == 1
    finally:
        assert not stop_server(server), "processes left running"

"""A process killed (SIGKILL) while publishing models never leaves the store without a loadable current version."""

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

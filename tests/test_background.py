"""Task subprocesses of the server (training, scoring) run at background priority and end with the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from app_helpers import APP_DIR

sys.path.insert(0, str(APP_DIR))  # the app's own `lib` package, as MONAI Label loads it
from lib.background import BACKGROUND_NICENESS, is_task_subprocess  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="priority and parent-death are Linux's")

# A "server" that starts a task child which enters the background, prints its pid, then waits to be ended.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=sys.stdout)
time.sleep(60)
"""
CHILD = f"""
import os, sys, time
sys.path.insert(0, {str(APP_DIR)!r})
from lib.background import enter_background
enter_background()
print(os.getpid(), os.getpriority(os.PRIO_PROCESS, 0), flush=True)
time.sleep(60)
"""


def test_this_process_is_not_a_task_subprocess():
    assert not is_task_subprocess()


def test_task_child_runs_at_background_priority_and_ends_with_its_parent():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(child=CHILD)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        pid, niceness = (int(v) for v in parent.stdout.readline().split())
        assert niceness >= BACKGROUND_NICENESS
        child = psutil.Process(pid)
        assert child.ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)  # the server dies without cleaning up
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, "task outlived the server"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)


@pytest.mark.e2e
def test_stopping_the_server_mid_training_leaves_no_task_running(tmp_path):
    """`kill <server pid>` (a service manager's stop) while a training runs: the server ends its task and exits."""
    from app_helpers import alive, app_conf, make_datastore, start_server, stop_server, wait_for

    store = make_datastore(tmp_path)
    conf = app_conf(tmp_path, threads=1, epochs=500, train_mode="full")  # a training that outlasts the test
    server = start_server(store["studies"], conf, tmp_path / "work")
    try:
        server.post("/train/samora", {})
        stats = wait_for(
            lambda: server.client.info()["train_stats"].get("samora", {}),
            lambda s: s.get("status") == "RUNNING" and s.get("epoch", 0) >= 1,
            timeout=120,
            interval=0.5,
        )
        tasks = server.remember_children()
        assert tasks, f"no task subprocess while training runs ({stats})"
        server.proc.send_signal(signal.SIGTERM)  # the server alone, not its process group
        server.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(tasks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(tasks), f"task(s) {sorted(alive(tasks))} outlived the server:\n{server.log_tail()}"
    finally:
        stop_server(server)

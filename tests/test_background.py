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
from lib.task_pause import TaskPause  # noqa: E402

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


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped-during-a-request"])
def test_task_child_runs_at_background_priority_and_ends_with_its_parent(stopped):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(child=CHILD)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        pid, niceness = (int(v) for v in parent.stdout.readline().split())
        assert niceness >= BACKGROUND_NICENESS
        child = psutil.Process(pid)
        assert child.ppid() == parent.pid
        if stopped:  # as lib/task_pause.py leaves it while a request runs
            os.kill(pid, signal.SIGSTOP)
        parent.send_signal(signal.SIGKILL)  # the server dies without cleaning up
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, "task outlived the server"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)


def _busy_task() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _state(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 5  # a signal is delivered asynchronously
    status = psutil.Process(process.pid).status()
    while status not in (psutil.STATUS_STOPPED, psutil.STATUS_RUNNING) and time.monotonic() < deadline:
        time.sleep(0.02)
        status = psutil.Process(process.pid).status()
    return status


def _wait_state(process: subprocess.Popen, wanted: str) -> str:
    deadline = time.monotonic() + 5
    while (status := _state(process)) != wanted and time.monotonic() < deadline:
        time.sleep(0.02)
    return status


def test_tasks_stop_while_requests_run_and_continue_after_the_last_one():
    tasks = [_busy_task(), _busy_task()]
    pause = TaskPause(enabled=True, task_pids=lambda: [t.pid for t in tasks])
    try:
        with pause.during_request():
            assert [_wait_state(t, psutil.STATUS_STOPPED) for t in tasks] == [psutil.STATUS_STOPPED] * 2
            with pause.during_request():  # a second request overlaps the first, which then ends first
                pass
            assert [_state(t) for t in tasks] == [psutil.STATUS_STOPPED] * 2  # one request still in flight
            tasks[1].kill()  # a task that ends while stopped is skipped when the others continue
            tasks[1].wait(timeout=10)
        assert _wait_state(tasks[0], psutil.STATUS_RUNNING) == psutil.STATUS_RUNNING
        with pytest.raises(RuntimeError, match="request failed"), pause.during_request():
            raise RuntimeError("request failed")  # a failing request continues the tasks too
        assert _wait_state(tasks[0], psutil.STATUS_RUNNING) == psutil.STATUS_RUNNING
    finally:
        for task in tasks:
            task.kill()
            task.wait(timeout=10)


def test_a_disabled_pause_leaves_tasks_running():
    task = _busy_task()
    try:
        with TaskPause(enabled=False, task_pids=lambda: [task.pid]).during_request():
            time.sleep(0.2)
            assert _state(task) == psutil.STATUS_RUNNING
    finally:
        task.kill()
        task.wait(timeout=10)


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
        # a prompt in the meantime stops the training task while it runs in the server (pause_tasks auto on a CPU)
        image = store["unlabeled"][0]
        params = {"label": "liver", "foreground": [[30, 30, 12]], "background": [], "roi": [], "slice": 12}
        path, result = server.client.infer("samora_prompt", image, params)
        assert path is not None, result
        stopped = [line for line in server.log_tail(100_000).splitlines() if "task process(es)" in line]
        assert any(str(t.pid) in line for t in tasks for line in stopped), f"no task stopped for the prompt: {stopped}"
        assert server.client.info()["train_stats"]["samora"]["status"] == "RUNNING"  # continued, not ended
        server.proc.send_signal(signal.SIGTERM)  # the server alone, not its process group
        server.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while alive(tasks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(tasks), f"task(s) {sorted(alive(tasks))} outlived the server:\n{server.log_tail()}"
    finally:
        stop_server(server)

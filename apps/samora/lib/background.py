"""MONAI Label runs training, scoring and batch inference as subprocesses of the server. When this process is one of
them, it runs at background priority (an annotator's request in the server always comes first: on a small CPU two
processes with a thread per core each slowed one another ~10x) and it ends when the server ends. In the server, a
stop signal ends the running tasks first: MONAI Label would otherwise wait for them (its task thread reads their
output until they exit), or leave them running if the server is killed."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

TASK_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label's AsyncTask runs with `python -m`
BACKGROUND_NICENESS = 10  # CFS weight ~110 against the server's 1024: ~10% of a core it is asked for
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# SIGKILL, not SIGTERM: a task stopped during a request (lib/task_pause.py) stayed stopped on a SIGTERM (tested)
_DEATH_SIGNAL = signal.SIGKILL


def is_task_subprocess() -> bool:
    """True in a train/scoring/batch-infer subprocess that the MONAI Label server started."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == TASK_MODULE


def enter_background() -> None:
    """Lower every thread of this process to background priority and ask the kernel to end it with its parent."""
    for tid in _thread_ids():
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, max(current, BACKGROUND_NICENESS))
        except OSError as e:  # a thread that ended meanwhile
            log.debug("priority of thread %d unchanged: %s", tid, e)
    _die_with_parent()
    log.info(
        "task subprocess %d: background priority (nice %d), ends with the server", os.getpid(), BACKGROUND_NICENESS
    )


def _thread_ids() -> list[int]:
    tasks = Path("/proc/self/task")
    return [int(p.name) for p in tasks.iterdir()] if tasks.is_dir() else [0]


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, _DEATH_SIGNAL, 0, 0, 0) != 0:
            log.warning("could not tie the task to the server's life: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        log.warning("could not tie the task to the server's life: %s", e)
        return
    if os.getppid() == 1:  # the server ended before the signal was armed
        os.kill(os.getpid(), _DEATH_SIGNAL)


def end_tasks_on_stop() -> None:
    """In the server: on SIGTERM/SIGINT, send SIGTERM to every running task subprocess, then let the server's own
    handler (uvicorn's graceful shutdown) run. Only possible from the main thread (not under a test client)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if callable(previous):
            signal.signal(sig, _chain(previous))


def _chain(previous):
    def handler(sig, frame):
        _terminate_tasks()
        previous(sig, frame)

    return handler


def _terminate_tasks() -> None:
    from monailabel.utils.async_tasks.utils import background_processes

    for method, processes in list(background_processes.items()):
        for process in list(processes.values()):
            if process.poll() is None:
                log.info("server stopping: ending the %s task (pid %d)", method, process.pid)
                process.terminate()
                process.send_signal(signal.SIGCONT)  # stopped during a request (lib/task_pause.py): wake it to end

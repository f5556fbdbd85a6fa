"""While an annotator's request runs in the server, MONAI Label's task subprocesses (training, SSL bootstrap,
scoring) are stopped with SIGSTOP and continued with SIGCONT when the last request in flight ends.

Background priority (lib/background.py) is not enough on a small CPU: a task at nice 10 still takes a slice of
each core now and then, and the server's threads, which meet at a barrier after every operator, wait for the one
it displaced; auto-segmentation ran ~40% slower beside a background SSL run. A stopped task holds its memory and
resumes exactly where it was. A stopping server continues its tasks as it ends them (lib/background.py), and a
task stopped when the server dies still ends: its death signal is SIGKILL, which ends a stopped process too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil

log = logging.getLogger(__name__)


def running_task_pids() -> list[int]:
    """Process ids of MONAI Label's running task subprocesses and their children (multi-process trainings)."""
    from monailabel.utils.async_tasks.utils import background_processes

    pids = []
    for processes in list(background_processes.values()):
        for process in list(processes.values()):
            if process.poll() is None:
                pids.append(process.pid)
                pids.extend(_children(process.pid))
    return pids


def _children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:  # ended meanwhile
        return []


class TaskPause:
    """Counts the requests in flight; the first one stops the running tasks, the last one continues them."""

    def __init__(self, enabled: bool, task_pids: Callable[[], list[int]] = running_task_pids) -> None:
        self.enabled = enabled
        self._task_pids = task_pids
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopped: list[int] = []

    @contextmanager
    def during_request(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._lock:
            self._in_flight += 1
            if self._in_flight == 1:
                self._stopped = _signal_all(self._task_pids(), signal.SIGSTOP)
                if self._stopped:
                    log.info("request in flight: task process(es) %s stopped until it ends", self._stopped)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    _signal_all(self._stopped, signal.SIGCONT)
                    self._stopped = []


def _signal_all(pids: list[int], sig: signal.Signals) -> list[int]:
    """Send `sig` to each process; returns those that received it (a task that ended meanwhile is skipped)."""
    reached = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            reached.append(pid)
        except ProcessLookupError:
            continue
    return reached

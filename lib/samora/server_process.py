"""A real `monailabel start_server` subprocess in its own process group, and a client for it.

Used by the end-to-end tests and by the demo benchmark (bench/demo_sample_data.py), which start the app exactly as
a user does; stop_server ends the whole group, the app's train and scoring subprocesses included.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "samora"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def monailabel_env(work: Path, **overrides: str) -> dict[str, str]:
    """Environment for a server subprocess: this venv's python, sessions/caches in `work`, no tracking."""
    env = dict(os.environ)
    env.update(
        {
            "MONAILABEL_PYEXE": sys.executable,  # the `monailabel` script execs this python
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "MONAI_LABEL_TRACKING_ENABLED": "false",
            "MONAI_LABEL_SESSION_PATH": str(work / "sessions"),
            "MONAI_LABEL_DATASTORE_CACHE_PATH": str(work / "cache"),
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicomweb_cache"),  # else ~/.cache, one folder per URL
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@dataclass
class ServerProcess:
    """A `monailabel start_server` process group and a client for it."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant ever observed
    launched: float = field(default_factory=time.monotonic)  # time.monotonic() just before the launch

    @property
    def client(self) -> MONAILabelClient:
        return MONAILabelClient(self.url, tmpdir=str(self.log_path.parent))

    def log_tail(self, n: int = 4000) -> str:
        """The last n characters of the server log (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def remember_children(self) -> list[psutil.Process]:
        """Record every current descendant (train/scoring subprocesses) so stop() can check they are gone."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return list(self.seen.values())

    def post(self, selector: str, body: dict | None = None) -> dict:
        """POST with MONAI Label's own client utilities (for endpoints MONAILabelClient has no method for)."""
        status, response, _, _ = MONAILabelUtils.http_method("POST", self.url, selector, body or {})
        if status != 200:
            raise AssertionError(f"POST {selector}: {status} {response!r}")
        return json.loads(response)

    def get(self, selector: str) -> tuple[int, Any]:
        """GET returning (status, parsed JSON or raw text)."""
        status, response, _, _ = MONAILabelUtils.http_method("GET", self.url, selector)
        try:
            return status, json.loads(response)
        except ValueError:
            return status, response


def start_server(
    studies: Path, conf: dict[str, str], work: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> ServerProcess:
    """Start `monailabel start_server` in its own session (process group) and wait until /info answers."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    exe = Path(sys.executable).parent / "monailabel"
    cmd = [str(exe) if exe.exists() else "monailabel", "start_server", "--app", str(APP_DIR), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        if any(c.isspace() for c in str(value)):
            raise ValueError(f"conf {key}={value!r}: the monailabel launcher splits arguments on whitespace")
        cmd += ["--conf", key, str(value)]
    log_path = work / "server.log"
    launched = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or monailabel_env(work),
            cwd=str(work),
            start_new_session=True,
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, launched=launched)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering:\n{server.log_tail()}")
        try:
            server.client.info()
            return server
        except (OSError, MONAILabelClientException):
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise TimeoutError(f"server did not answer /info within {timeout:.0f}s:\n{server.log_tail()}")
        time.sleep(1.0)


def _group_members(pgid: int) -> set[int]:
    members = set()
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.add(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def alive(procs: list[psutil.Process]) -> set[int]:
    """Pids of the processes that still run; a reused pid is not ours, a zombie holds nothing but a table slot."""
    out = set()
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.Error:
            continue
    return out


def stop_server(server: ServerProcess, grace: float = 15) -> set[int]:
    """SIGTERM the server's whole process group, SIGKILL what is left; returns pids still alive (should be none)."""
    pgid = server.proc.pid  # start_new_session: the server leads its own group
    tracked = server.remember_children()
    try:
        tracked.append(psutil.Process(server.proc.pid))
    except psutil.NoSuchProcess:
        pass
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        server.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while (_group_members(pgid) or alive(tracked)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_members(pgid) or alive(tracked):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in tracked:
            try:
                if p.is_running():  # psutil checks the pid was not reused
                    p.kill()
            except psutil.Error:
                pass
        try:
            server.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
    return _group_members(pgid) | alive(tracked)

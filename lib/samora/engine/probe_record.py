"""The encoder-path probe's choice, kept per machine in the model folder.

Timing every candidate path costs about 20 s with LiteMedSAM on 2 CPU cores, paid by the first request after each
start. The choice depends on the machine, the libraries and the architecture, not on the weights, so a restarted
server reuses it where all of those are unchanged; it then also keeps the same path (and the masks' last pixels)
from one start to the next. Deleting the folder makes the next start probe again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from samora.engine.precision import cpu_supports_bf16
from samora.io_utils import atomic_write_json

log = logging.getLogger(__name__)

FOLDER = "encoder_probe"
RUNTIME_PACKAGES = ("onnxruntime", "openvino")
# a probe during which other processes kept more than this share of the machine's CPU busy (a training task, say)
# timed the paths under contention: its choice serves this start but is not kept for the next ones
BUSY_SHARE = 0.2


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (platform's guess where /proc/cpuinfo is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def package_version(name: str) -> str | None:
    """The installed version of a distribution package, or None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_key(config, device: str | torch.device, names: list[str]) -> dict:
    """What the probe's choice depends on: the architecture (model config's preset and input size), the candidate
    paths, the libraries that run them, and the device (CPU model, instruction set, bf16, cores and threads; or GPU)."""
    device = torch.device(device)
    key = {
        "preset": config.preset,
        "image_size": config.image_size,
        "candidates": list(names),
        "torch": torch.__version__,
        **{name: package_version(name) for name in RUNTIME_PACKAGES},
        "device": device.type,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        return {**key, "gpu": torch.cuda.get_device_name(device)}
    return {
        **key,
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": cpu_supports_bf16(),
        "cores": usable_cores(),
    }


def record_file(folder: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / FOLDER / f"{digest}.json"


def load(folder: str | os.PathLike, key: dict) -> dict | None:
    """The record an earlier probe under the same key left in `folder` ({"chosen", "rows", "measured"}), or None
    (none yet, or unreadable: a warning, and the caller probes again)."""
    path = record_file(folder, key)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("encoder probe record %s unreadable (%s): probing again", path, e)
        return None
    if not isinstance(record, dict) or record.get("key") != key or not {"chosen", "rows", "measured"} <= set(record):
        log.warning("encoder probe record %s is not one for this machine and model: probing again", path)
        return None
    return record


def save(folder: str | os.PathLike, key: dict, chosen: str, rows: list[dict], measured: str) -> dict:
    """Write the probe's choice, timings and their time under `key` (atomically: a crash leaves the old record or
    none)."""
    record = {"key": key, "chosen": chosen, "rows": rows, "measured": measured}
    path = record_file(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall clock, seconds of busy CPU on the whole machine, seconds of CPU this process used); None where the
    kernel does not report the machine's CPU time (/proc/stat: Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal; guest time is counted in user
    return time.monotonic(), busy, time.process_time()


def others_busy_share(before, after) -> float:
    """The share of the machine's CPU that other processes kept busy between two cpu_snapshot()s (0 where unknown)."""
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / ((after[0] - before[0]) * (os.cpu_count() or 1)))

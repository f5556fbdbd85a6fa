"""What every result JSON records: the machine, the command, the date; and JSON written and read back safely."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from paths import ROOT

from samora.io_utils import atomic_write_json


def machine_info(workers: int, threads: int) -> dict[str, Any]:
    """The machine and software the numbers were measured on."""
    import monai

    import samora
    from samora.engine.precision import cpu_supports_bf16
    from samora.engine.probe_record import cpu_name, usable_cores

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none: GPU rows not measured (no GPU lent)"
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        # the same CPU model is lent with and without AVX-512: the encoder's speed and bf16 depend on it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": cpu_supports_bf16(),
        "cpu_cores_visible": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "workers": workers,
        "torch_threads_per_worker": threads,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "samora": samora.__version__,
    }


def run_header(benchmark: str, args: Any) -> dict[str, Any]:
    """The fields that open a benchmark's JSON record: its name, the command, the date and the machine."""
    return {
        "benchmark": benchmark,
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(args.workers, args.threads),
        "quick": bool(args.quick),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, relative to the project root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join(["python", script_text, *(shlex.quote(a) for a in argv[1:])])


def now_utc() -> str:
    """ISO date-time in UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def json_safe(obj: Any) -> Any:
    """Plain JSON: NaN -> null, +-inf -> "inf"/"-inf", numpy scalars/arrays -> Python values."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` (made JSON-safe) atomically, keys in their order (tables follow it); returns the path."""
    return atomic_write_json(path, json_safe(data), sort_keys=False)


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())

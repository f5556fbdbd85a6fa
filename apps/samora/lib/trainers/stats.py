"""Training progress shared between the training subprocess (writer) and the server (stats() reader)."""

from __future__ import annotations

import json
from pathlib import Path

from samora.io_utils import atomic_write_json


class StatsFile:
    """Atomic JSON file holding the latest progress of one trainer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, stats: dict) -> None:
        atomic_write_json(self.path, stats)

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

"""Where a stage-1 run keeps its state: the resumable checkpoint of each level, its loss log, and the RNG state
that travels with the checkpoint so that a resumed run continues exactly where it stopped."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samora.config import ModelConfig
from samora.io_utils import atomic_write
from samora.plots import read_loss_log

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_path",
    "load_checkpoint",
    "log_path",
    "mean_loss",
    "model_signature",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "truncate_log",
]

CHECKPOINT_FORMAT = "samora-ssl-checkpoint/1"


def checkpoint_path(out_dir: str | Path, level: str) -> Path:
    """Where the resumable checkpoint of `level` lives."""
    return Path(out_dir) / "checkpoints" / f"ssl_{level}.pt"


def log_path(out_dir: str | Path, level: str) -> Path:
    """The JSON-lines loss log of `level`."""
    return Path(out_dir) / f"loss_{level}.jsonl"


def model_signature(config: ModelConfig) -> dict[str, Any]:
    """What a checkpoint must share with the model that resumes it."""
    return {"preset": config.preset, "image_size": config.image_size, "rank": config.expert_rank}


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (so the checkpoint loads with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (`state` without its format tag)."""
    atomic_write(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def load_checkpoint(
    path: Path, level: str, signature: dict[str, Any], data_hash: str, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The checkpoint of `level` to resume from; None when there is none or it was trained on other studies.
    A checkpoint of another format, level or model is an error."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("level") != level:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint for level {level!r}; delete it to restart")
    if state.get("model") != signature:
        raise ValueError(
            f"{path} was written for model {state.get('model')}, this run uses {signature}; "
            "use another output folder or delete the checkpoint"
        )
    if str(state.get("data_hash")) != data_hash:
        # New or changed studies (e.g. the datastore grew): the half-trained expert belongs to other data.
        log(f"[{level}] {path} was trained on different studies; restarting this level on the current ones")
        return None
    return state


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= `step` (the steps after the checkpoint are about to be redone)."""
    if not path.exists():
        return
    kept = [r for r in read_loss_log(path) if r.get("step", 0) <= step]

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    atomic_write(path, write)


def mean_loss(records: Sequence[dict]) -> float | None:
    """Mean "loss" of loss-log records (None without any)."""
    values = [r["loss"] for r in records if "loss" in r]
    return float(sum(values) / len(values)) if values else None

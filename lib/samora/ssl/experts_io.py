"""Expert files: `expert_<level>.safetensors` (that expert's LoRA weights only) + `expert_<level>.json` (metadata).

The JSON is written last, after the weights and their checksum, so its presence means the expert is complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

import samora
from samora.adapters.experts import expert_state, load_expert_state
from samora.config import EXPERTS
from samora.io_utils import atomic_write, atomic_write_json, sha256_file

__all__ = [
    "EXPERT_FORMAT",
    "ExpertFileError",
    "expert_paths",
    "load_experts",
    "read_expert_metadata",
    "save_expert",
    "trained_levels",
    "verify_expert",
]

EXPERT_FORMAT = "samora-expert/1"
log = logging.getLogger(__name__)


class ExpertFileError(ValueError):
    """An expert file is missing, corrupt, or does not fit the model; the message names the file."""


def expert_paths(directory: str | Path, level: str) -> tuple[Path, Path]:
    """(weights, metadata) paths of one expert."""
    if level not in EXPERTS:
        raise ValueError(f"unknown expert level {level!r}; choose one of {EXPERTS}")
    directory = Path(directory)
    return directory / f"expert_{level}.safetensors", directory / f"expert_{level}.json"


def save_expert(model: nn.Module, level: str, directory: str | Path, metadata: dict[str, Any]) -> Path:
    """Write one expert's weights and metadata atomically; returns the metadata path."""
    weights_path, meta_path = expert_paths(directory, level)
    state = {k: v.contiguous() for k, v in expert_state(model.backbone.encoder, level).items()}
    atomic_write(weights_path, lambda tmp: save_file(state, tmp, metadata={"format": EXPERT_FORMAT, "level": level}))
    config = model.config
    meta = {
        "format": EXPERT_FORMAT,
        "level": level,
        "preset": config.preset,
        "image_size": config.image_size,
        "rank": config.expert_rank,
        "context": config.context,
        "backbone_checkpoint": Path(config.checkpoint).name if config.checkpoint else None,
        "samora_version": samora.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **metadata,
        "weights_file": weights_path.name,
        "sha256": sha256_file(weights_path),
    }
    atomic_write_json(meta_path, meta)
    return meta_path


def read_expert_metadata(directory: str | Path, level: str) -> dict[str, Any]:
    """The metadata of one expert (ExpertFileError if missing or malformed)."""
    _, meta_path = expert_paths(directory, level)
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as e:
        raise ExpertFileError(f"{meta_path} is missing: expert {level!r} has not been trained here") from e
    except json.JSONDecodeError as e:
        raise ExpertFileError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != EXPERT_FORMAT or meta.get("level") != level:
        raise ExpertFileError(f"{meta_path} is not a {EXPERT_FORMAT} file for level {level!r}")
    return meta


def verify_expert(directory: str | Path, level: str) -> dict[str, Any]:
    """Metadata of an expert whose weights exist and match the recorded sha256."""
    weights_path, meta_path = expert_paths(directory, level)
    meta = read_expert_metadata(directory, level)
    if not weights_path.is_file():
        raise ExpertFileError(f"{weights_path} is missing (its metadata {meta_path.name} exists)")
    actual = sha256_file(weights_path)
    if actual != meta.get("sha256"):
        raise ExpertFileError(f"{weights_path} is corrupt: sha256 {actual} != {meta.get('sha256')} in {meta_path.name}")
    return meta


def trained_levels(directory: str | Path) -> list[str]:
    """Levels with a complete, checksum-valid expert in `directory`, in canonical order."""
    found = []
    for level in EXPERTS:
        try:
            verify_expert(directory, level)
        except ExpertFileError:
            continue
        found.append(level)
    return found


def check_compatible(meta: dict[str, Any], model: nn.Module, source: str | Path) -> None:
    """Raise ExpertFileError naming `source` when preset, rank or image size differ from the model's."""
    config = model.config
    for key, attr in (("preset", "preset"), ("rank", "expert_rank"), ("image_size", "image_size")):
        if meta.get(key) != getattr(config, attr):
            raise ExpertFileError(
                f"{source}: trained for {key}={meta.get(key)!r}, but the model has {key}={getattr(config, attr)!r}"
            )
    if meta.get("context", "single") != config.context:
        log.warning("%s: trained with context %r, model uses %r", source, meta.get("context"), config.context)
    trained_on = meta.get("backbone_checkpoint")
    current = Path(config.checkpoint).name if config.checkpoint else None
    if trained_on != current:
        log.warning("%s: trained on backbone checkpoint %s, model uses %s", source, trained_on, current)


def load_experts(model: nn.Module, directory: str | Path, levels: Sequence[str] | None = None) -> list[str]:
    """Verify and load experts into `model`; `levels=None` loads every expert present. Returns the levels loaded."""
    wanted: Iterable[str]
    if levels is None:
        wanted = [level for level in EXPERTS if expert_paths(directory, level)[1].exists()]
    else:
        unknown = [level for level in levels if level not in EXPERTS]
        if unknown:
            raise ValueError(f"unknown expert levels {unknown}; choose from {EXPERTS}")
        wanted = [level for level in EXPERTS if level in levels]
    # Check everything before touching the model, so a bad file leaves the model unchanged.
    states = {}
    for level in wanted:
        weights_path, meta_path = expert_paths(directory, level)
        meta = verify_expert(directory, level)
        check_compatible(meta, model, meta_path)
        states[level] = load_file(weights_path)
    for level, state in states.items():
        try:
            load_expert_state(model.backbone.encoder, level, state)
        except ValueError as e:
            raise ExpertFileError(f"{expert_paths(directory, level)[0]}: {e}") from e
    return list(states)

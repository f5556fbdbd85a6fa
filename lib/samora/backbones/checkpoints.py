"""Loading official SAM checkpoints from a local path, verified, and resized to any input size."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from samora.backbones.presets import BackbonePreset, HieraPreset
from samora.io_utils import sha256_file

WEIGHTS_DIR_ENV = "SAMORA_WEIGHTS_DIR"
_GLOBAL_REL_POS = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$")


class CheckpointError(FileNotFoundError):
    """A checkpoint is missing or fails verification; the message says what to do."""


def default_weights_dir() -> Path:
    """Folder searched for official checkpoints when no explicit path is given."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV, Path.home() / ".cache" / "samora" / "weights"))


def resolve_checkpoint(preset: BackbonePreset | HieraPreset, path: str | os.PathLike | None) -> Path:
    """Return an existing checkpoint path or raise CheckpointError naming the path, URL and sha256.

    Never downloads: this machine (and many hospital servers) have no route to the model hub.
    """
    expected = Path(path) if path else None
    if expected is None and preset.checkpoint is not None:
        expected = default_weights_dir() / preset.checkpoint.filename
    if expected is None:
        raise CheckpointError(f"preset {preset.name!r} has no official checkpoint; use checkpoint=None (random init)")
    if expected.is_file():
        return expected
    hint = ""
    if preset.checkpoint is not None:
        c = preset.checkpoint
        verify = f"verify sha256 {c.sha256}, " if c.sha256 else ""
        hint = (
            f" Download {c.filename} ({c.size}) from {c.url} on a machine with internet access, "
            f"{verify}and place it at {expected} "
            f"(or set {WEIGHTS_DIR_ENV} to its folder, or pass its path)."
        )
    kind = "SAM2" if preset.family == "sam2" else "SAM"
    raise CheckpointError(f"{kind} checkpoint for {preset.name!r} not found at {expected}.{hint}")


def verify_checksum(path: Path, preset: BackbonePreset | HieraPreset) -> None:
    """For a file carrying an official name, require its published sha256 (where one is published)."""
    official = preset.checkpoint
    if official is None or official.sha256 is None or path.name != official.filename:
        return
    actual = sha256_file(path)
    if actual != official.sha256:
        raise CheckpointError(
            f"{path} has sha256 {actual}, expected {official.sha256} for {official.filename}: "
            f"the file is corrupt or incomplete; download it again from {official.url}"
        )


def load_parts(state: dict[str, torch.Tensor], parts: dict[str, torch.nn.Module]) -> tuple[list[str], list[str]]:
    """Load each `prefix.`-keyed part of an official-layout state dict into its module; returns (missing,
    unexpected) keys with their prefixes (keys under no known prefix are unexpected)."""
    missing, unexpected = [], []
    for prefix, module in parts.items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        result = module.load_state_dict(part, strict=False)
        missing += [f"{prefix}.{k}" for k in result.missing_keys]
        unexpected += [f"{prefix}.{k}" for k in result.unexpected_keys]
    unexpected += [k for k in state if k.split(".")[0] not in parts]
    return missing, unexpected


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a SAM state dict without unpickling arbitrary objects."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def resize_for_image_size(
    state: dict[str, torch.Tensor], preset: BackbonePreset, image_size: int, patch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Adapt position embeddings and the GLOBAL blocks' relative-position tables to `image_size`.

    Windowed blocks keep their (2*window-1) tables. The block index is parsed from the key, so this is
    right for every preset (unlike substring matching on "2","5","8","11").
    """
    grid = image_size // patch_size
    out = dict(state)
    pos = state.get("image_encoder.pos_embed")
    if pos is not None and pos.shape[1] != grid:
        grid_first = pos.permute(0, 3, 1, 2).float()
        resized = F.interpolate(grid_first, size=(grid, grid), mode="bilinear", align_corners=False)
        out["image_encoder.pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype)
    rows = 2 * grid - 1
    for key, table in state.items():
        match = _GLOBAL_REL_POS.match(key)
        if not match or int(match.group(1)) not in preset.global_attn_indexes or table.shape[0] == rows:
            continue
        resized = F.interpolate(table.T.unsqueeze(0).float(), size=rows, mode="linear", align_corners=False)
        out[key] = resized[0].T.to(table.dtype)
    return out

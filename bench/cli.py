"""Command-line options every benchmark script shares, and the backbone preset they imply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paths import DEFAULT_WORK, ROOT


def preset_for(checkpoint: str | None, preset: str | None) -> str:
    """The backbone preset: as given, else read from an official checkpoint name, else 'tiny'."""
    if preset:
        return preset
    if checkpoint:
        name = Path(checkpoint).name
        for candidate in ("vit_b", "vit_l", "vit_h"):
            if candidate in name:
                return candidate
        raise SystemExit(f"cannot tell the preset of {checkpoint}; pass --preset vit_b|vit_l|vit_h")
    return "tiny"


def add_common_args(parser: Any) -> None:
    """Options every benchmark script shares."""
    parser.add_argument("--quick", action="store_true", help="minutes-long smoke version (CI)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="docs folder: results/<name>.json and PNG plots")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="scratch folder (SSL experts, caches)")
    parser.add_argument("--checkpoint", default=None, help="official SAM checkpoint (default: random backbone)")
    parser.add_argument("--preset", default=None, help="backbone preset (default tiny, or from --checkpoint's name)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")


def with_overrides(profile: dict[str, Any], args: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of a benchmark's settings `profile` with the command line's value for each of `keys` that was given."""
    settings = dict(profile)
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings

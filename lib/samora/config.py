"""Model configuration: one dataclass, validated, serialised next to every saved model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

EXPERTS: tuple[str, ...] = ("image", "patch", "pixel")
FUSION_MODES: tuple[str, ...] = ("reduced", "full", "sum", "image", "patch", "pixel", "none")
DECODERS: tuple[str, ...] = ("samed", "hsam")
FUSION_ORDERS: tuple[str, ...] = ("bottom_up", "top_down")
CONTEXTS: tuple[str, ...] = ("single", "2.5d")

# A sensible default for abdominal CT (names follow the BTCV/Synapse organs).
DEFAULT_LABELS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "aorta": 7,
    "pancreas": 8,
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild a SAMora model (the frozen backbone comes from `checkpoint` or `init_seed`)."""

    preset: str = "tiny"
    image_size: int = 256
    checkpoint: str | None = None
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    decoder: str = "samed"
    fusion: str = "reduced"
    fusion_width: int | None = None  # None: embed_dim // 4 for "reduced", embed_dim for "full"
    fusion_heads: int = 4
    fusion_order: str = "bottom_up"
    expert_rank: int = 4
    finetune_experts: bool = False  # SAMed-style baseline trains its LoRA in stage 2
    context: str = "single"  # "2.5d": neighbouring slices as the 3 channels
    prompt_head: bool = True
    hsam_feature_noise: float = 0.1
    init_seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_classes(self) -> int:
        """Number of output channels, background included."""
        return max(self.labels.values()) + 1

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        from samora.backbones.presets import PRESETS

        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}")
        multiple = PRESETS[self.preset].input_multiple
        native = getattr(PRESETS[self.preset], "native_size", None)
        if native is not None and self.image_size != native:
            raise ConfigError(f"image_size: {self.image_size!r} must be {native} (preset {self.preset!r})")
        if not isinstance(self.image_size, int) or self.image_size < 64 or self.image_size % multiple:
            raise ConfigError(
                f"image_size: {self.image_size!r} must be an integer >= 64 divisible by {multiple} "
                f"(preset {self.preset!r})"
            )
        for name, allowed in (
            ("decoder", DECODERS),
            ("fusion", FUSION_MODES),
            ("fusion_order", FUSION_ORDERS),
            ("context", CONTEXTS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {allowed}")
        if not self.labels:
            raise ConfigError("labels: at least one label is required")
        indices = list(self.labels.values())
        if any((not isinstance(i, int)) or i < 1 for i in indices) or len(set(indices)) != len(indices):
            raise ConfigError(f"labels: indices must be distinct integers >= 1 (0 is background), got {self.labels}")
        if self.expert_rank < 1:
            raise ConfigError(f"expert_rank: {self.expert_rank} must be >= 1")
        if self.fusion_width is not None and self.fusion_width % self.fusion_heads:
            raise ConfigError(
                f"fusion_width: {self.fusion_width} must be divisible by fusion_heads={self.fusion_heads}"
            )

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a dict, rejecting unknown keys so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        data = dict(data)
        if "labels" in data:
            data["labels"] = {str(k): int(v) for k, v in data["labels"].items()}
        return cls(**data)

    def to_json(self) -> str:
        """Serialise to JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

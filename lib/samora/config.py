"""Model configuration: one dataclass, validated, serialised next to every saved model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from samora.engine.precision import check_precision

EXPERTS: tuple[str, ...] = ("image", "patch", "pixel")
FUSION_MODES: tuple[str, ...] = ("reduced", "full", "sum", "image", "patch", "pixel", "none")
DECODERS: tuple[str, ...] = ("samed", "hsam")
# HL-Attn fuses bottom-up only; the field stays so that saved configs load (a "top_down" ablation was never run)
FUSION_ORDERS: tuple[str, ...] = ("bottom_up",)
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


DEFAULT_SSL_EPOCHS = 30  # stage-1 epochs per level when neither epochs nor max_steps is given (docs/design.md §7)


@dataclass
class SSLSettings:
    """Optimisation settings of one stage-1 expert's run (recorded in its metadata and checkpoint); the one place
    for their defaults (the `samora pretrain` options and `pretrain` read them from here)."""

    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of the total steps, at least one step
    poly_power: float = 0.9
    checkpoint_every: int = 100
    grad_clip: float | None = 1.0
    seed: int = 0
    num_workers: int = 0
    heldout_slices: int | None = None  # held-out evaluation on at most this many evenly spaced slices (None: all)
    precision: str = "fp32"  # "bf16": the objective's forward under bf16 autocast (samora.engine.precision)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        check_precision(self.precision)


def expert_levels(levels: str | Sequence[str]) -> tuple[str, ...]:
    """The requested expert levels (a sequence or "image,patch") in training order image, patch, pixel; raises
    ValueError unless they are a non-empty subset of EXPERTS."""
    if isinstance(levels, str):
        levels = [level.strip() for level in levels.split(",") if level.strip()]
    unknown = [level for level in levels if level not in EXPERTS]
    if unknown or not levels:
        raise ValueError(f"levels must be a non-empty subset of {','.join(EXPERTS)}, got {list(levels)}")
    return tuple(level for level in EXPERTS if level in levels)

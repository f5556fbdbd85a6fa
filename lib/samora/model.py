"""SamoraModel: backbone + LoRA experts + HL-Attn + decoders, aware of its training stage."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import samora
from samora.adapters.experts import attach_experts, expert_parameters
from samora.adapters.fusion import HLAttnFusion, first_divisor
from samora.backbones import build_backbone
from samora.config import EXPERTS, ModelConfig
from samora.decoders.hsam import HsamHead
from samora.decoders.prompt import PromptHead
from samora.decoders.samed import SamedHead
from samora.io_utils import atomic_write, atomic_write_json, sha256_file

# "finetune" trains HL-Attn + heads + prompt path through the encoder; "finetune-heads" only the heads and the
# prompt path, on embeddings of the frozen encoder (the cheap mode: embeddings computed once and cached).
STAGES: tuple[str, ...] = ("ssl-image", "ssl-patch", "ssl-pixel", "finetune", "finetune-heads", "inference")
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
log = logging.getLogger(__name__)


class ModelFileError(RuntimeError):
    """A saved model is missing, corrupt or does not fit; the message names the file."""


class SamoraModel(nn.Module):
    """The whole SAMora network. Input: (B, 3, S, S) slices scaled to [0, 1] (pixel mean 0, std 1)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Random parts are seeded so a model rebuilt from its config has the same frozen backbone bit-for-bit.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.backbone = build_backbone(config.preset, config.image_size, config.checkpoint)
            attach_experts(self.backbone.encoder, rank=config.expert_rank)
            if config.fusion in ("reduced", "full"):
                for site in self.backbone.attention_sites():
                    dim = site.core.width
                    width = config.fusion_width or (dim if config.fusion == "full" else dim // 4)
                    heads = config.fusion_heads if config.fusion == "reduced" else first_divisor(width)
                    site.fusion = HLAttnFusion(dim, width, heads)
            sam_decoder = self.backbone.take_mask_decoder()
            if config.decoder == "samed":
                self.head: nn.Module = SamedHead(sam_decoder, config.num_classes, config.image_size)
            else:
                self.head = HsamHead(
                    sam_decoder,
                    config.num_classes,
                    config.image_size,
                    config.hsam_feature_noise,
                    embedding_stride=self.backbone.embedding_stride,
                )
            self.prompt_head = PromptHead(sam_decoder, config.image_size) if config.prompt_head else None
        self.load_report = dict(self.backbone.load_report)
        self.load_report["reinitialised"] = self._reinitialised_parts()
        if self.load_report["checkpoint"]:
            log.info("re-initialised (not in the checkpoint): %s", ", ".join(self.load_report["reinitialised"]))
        self.stage = "inference"
        self.set_stage("inference")

    def _reinitialised_parts(self) -> list[str]:
        """Modules that start fresh rather than from SAM weights: experts, fusion, class-dependent decoder parts."""
        # A SAM2 checkpoint holds no SAM prompt encoder / mask decoder: the backbone lists what it could not load.
        parts = list(self.backbone.load_report.get("not_in_checkpoint", []))
        parts.append(f"experts ({', '.join(EXPERTS)})")
        if self.fusion_parameters():
            parts.append("fusion")
        parts += [f"head.decoder.{name}" for name in SamedHead.REINITIALISED]
        if isinstance(self.head, HsamHead):
            parts.append("head.stage-2 decoder (all but stage1)")
        return parts

    # ----- stages -------------------------------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        """Route attention and freeze everything except what `stage` trains."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
        self.stage = stage
        for p in self.parameters():
            p.requires_grad_(False)
        if stage.startswith("ssl-"):
            expert = stage[4:]
            mode = expert
            for p in expert_parameters(self.backbone.encoder, expert).values():
                p.requires_grad_(True)
        else:
            mode = _attention_mode(self.config.fusion)
            trained = {"finetune": self.finetune_parameters, "finetune-heads": self.head_parameters}.get(stage)
            for p in trained() if trained else []:
                p.requires_grad_(True)
        for site in self.backbone.attention_sites():
            site.mode = mode

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything after the image embedding: the prompt-free head and the prompt path."""
        return list(self.head.parameters()) + self.prompt_path_parameters()

    def prompt_path_parameters(self) -> list[nn.Parameter]:
        """SAM's prompt encoder and the prompt decoder (pretrained on real backbones)."""
        params = list(self.backbone.prompt_encoder.parameters())
        if self.prompt_head is not None:
            params += list(self.prompt_head.parameters())
        return params

    def finetune_parameters(self) -> list[nn.Parameter]:
        """Stage-2 trainables: fusion, decoders, prompt encoder (+ the experts for the SAMed-style baseline)."""
        params = list(self.fusion_parameters().values()) + self.head_parameters()
        if self.config.finetune_experts:
            for name in _experts_in_use(self.config.fusion):
                params += list(expert_parameters(self.backbone.encoder, name).values())
        return params

    def fusion_parameters(self) -> dict[str, nn.Parameter]:
        """HL-Attn parameters by qualified name."""
        return {k: p for k, p in self.named_parameters() if ".fusion." in k}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current stage trains."""
        return [p for p in self.parameters() if p.requires_grad]

    # ----- forward ------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embedding (B, C, S/stride, S/stride) with the stage's expert routing."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.config.image_size:
            raise ValueError(
                f"expected images (B, 3, {self.config.image_size}, {self.config.image_size}), got {tuple(images.shape)}"
            )
        return self.backbone.encode(images).embedding

    def decode(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prompt-free multi-class decoding of an embedding."""
        return self.head(embedding, self.backbone.prompt_encoder)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(images))

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-class probabilities (B, K, S, S) from a decode() result."""
        return self.head.probabilities(out)

    def prompt(self, embedding: torch.Tensor, **prompts) -> dict[str, torch.Tensor]:
        """Interactive decoding of points/boxes on a (cached) embedding."""
        if self.prompt_head is None:
            raise RuntimeError("this model was built with prompt_head=False")
        return self.prompt_head(embedding, self.backbone.prompt_encoder, **prompts)

    # ----- reporting ----------------------------------------------------------------------------------------
    def parameter_report(self) -> dict:
        """Total/frozen/trainable counts per component, and the trainable count of every stage."""
        encoder_base = sum(
            p.numel() for k, p in self.backbone.encoder.named_parameters() if "lora_" not in k and ".fusion." not in k
        )
        components = {
            "encoder_frozen": encoder_base,
            **{f"expert_{e}": _count(expert_parameters(self.backbone.encoder, e).values()) for e in EXPERTS},
            "fusion": _count(self.fusion_parameters().values()),
            "decoder": _count(self.head.parameters()),
            "prompt_encoder": _count(self.backbone.prompt_encoder.parameters()),
            "prompt_decoder": _count(self.prompt_head.parameters()) if self.prompt_head is not None else 0,
        }
        total = _count(self.parameters())
        current = self.stage
        stages = {}
        for stage in STAGES[:-1]:
            self.set_stage(stage)
            trainable = _count(self.trainable_parameters())
            stages[stage] = {"trainable": trainable, "frozen": total - trainable}
        self.set_stage(current)
        return {"total": total, "components": components, "stages": stages}

    # ----- persistence --------------------------------------------------------------------------------------
    def saved_state(self) -> dict[str, torch.Tensor]:
        """Everything except the frozen SAM encoder weights: experts, fusion, decoders, prompt encoder."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.encoder.") or "lora_" in k or ".fusion." in k
        }

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write weights.safetensors + model.json (config, stage, versions, checksum) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.saved_state()
        weights = atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
        meta = {
            "format": "samora-model/1",
            "config": self.config.to_dict(),
            "stage": self.stage,
            "backbone": {"family": self.backbone.family, "preset": self.config.preset},
            "image_size": self.config.image_size,
            "labels": self.config.labels,
            "weights_sha256": sha256_file(weights),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(metadata or {}),
        }
        atomic_write_json(directory / META_FILE, meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path, checkpoint: str | None = None, map_location: str = "cpu") -> SamoraModel:
        """Rebuild from model.json, verify the weights' checksum, load them; `checkpoint` overrides the SAM path."""
        directory = Path(directory)
        meta = read_metadata(directory)
        config_data = dict(meta["config"])
        if checkpoint is not None:
            config_data["checkpoint"] = checkpoint
        model = cls(ModelConfig.from_dict(config_data))
        model.load_weights(directory, meta)
        model.set_stage(meta.get("stage", "inference") if meta.get("stage") != "finetune" else "inference")
        return model.to(map_location)

    def load_weights(self, directory: Path, meta: dict | None = None) -> None:
        """Load weights.safetensors into this model after checking its sha256 against the metadata."""
        meta = meta or read_metadata(directory)
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise ModelFileError(f"{path} is missing")
        actual = sha256_file(path)
        if actual != meta.get("weights_sha256"):
            raise ModelFileError(f"{path} is corrupt: sha256 {actual} != {meta.get('weights_sha256')} in {META_FILE}")
        state = load_file(path)
        expected = set(self.saved_state())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ModelFileError(
                f"{path} does not fit this model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        self.load_state_dict(state, strict=False)


def read_metadata(directory: str | Path) -> dict:
    """Read and sanity-check model.json."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelFileError(f"{path} is missing: not a saved SAMora model") from e
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path} is not valid JSON: {e}") from e
    if meta.get("format") != "samora-model/1" or "config" not in meta:
        raise ModelFileError(f"{path} is not a samora-model/1 metadata file")
    return meta


def _attention_mode(fusion: str) -> str:
    return {"reduced": "fusion", "full": "fusion", "sum": "sum", "none": "off"}.get(fusion, fusion)


def _experts_in_use(fusion: str) -> tuple[str, ...]:
    if fusion in EXPERTS:
        return (fusion,)
    return () if fusion == "none" else EXPERTS


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _versions() -> dict[str, str]:
    import peft

    return {
        "samora": samora.__version__,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }

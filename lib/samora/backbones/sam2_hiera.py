"""SAM2 Hiera backbone built from the sam2 package's classes (Hiera trunk, FPN neck), with SAM's decoders.

The decoders are segment-anything's PromptEncoder/MaskDecoder on the stride-16 neck output, exactly as for the
SAM ViT family, so every head works unchanged. SAM2's own decoder (which also consumes the stride-4/8 features and
adds a "no memory" embedding) is not used: `high_res` is returned for heads that want it, the current heads ignore it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import Hiera, MultiScaleAttention, do_pool
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine

from samora.adapters.attention import AdaptedAttention, SplitQKV
from samora.backbones.base import AttentionCore, Backbone, BackboneOutput
from samora.backbones.checkpoints import read_state_dict, resolve_checkpoint, verify_checksum
from samora.backbones.presets import HieraPreset
from samora.backbones.sam_decoders import build_mask_decoder, build_prompt_encoder
from samora.config import EXPERTS

log = logging.getLogger(__name__)

ENCODER_PREFIX = "image_encoder."
# Parts of SAMora's model that a SAM2 checkpoint does not provide (its decoder is SAM2's, not SAM's).
NOT_IN_CHECKPOINT = ("prompt_encoder", "mask_decoder (heads start from random init)")


class HieraAttentionCore(AttentionCore):
    """Hiera's multi-scale attention with its fused qkv split into q, k, v.

    In a q-pooling block (first block of stages 2-4) qkv maps dim -> 3*dim_out and the query is max-pooled, so the
    output has a quarter of the input tokens; `width` is dim_out, the width the fusion runs at.
    """

    def __init__(self, attn: MultiScaleAttention) -> None:
        super().__init__()
        self.qkv = SplitQKV(attn.qkv)
        self.proj = attn.proj
        self.num_heads = attn.num_heads
        self.q_pool = attn.q_pool
        self.width = attn.dim_out

    def attend(self, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).unbind(2)
        if self.q_pool is not None:
            q = do_pool(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def build_image_encoder(preset: HieraPreset) -> ImageEncoder:
    """Hiera trunk + FPN neck as in sam2's configs (scalp 1: the stride-32 level is dropped after the top-down pass)."""
    trunk = Hiera(
        embed_dim=preset.embed_dim,
        num_heads=preset.num_heads,
        stages=preset.stages,
        global_att_blocks=preset.global_att_blocks,
        window_spec=preset.window_spec,
        window_pos_embed_bkg_spatial_size=preset.window_pos_embed_bkg_spatial_size,
    )
    # warmup_cache off: it would run CUDA work in a constructor.
    position = PositionEmbeddingSine(num_pos_feats=preset.prompt_dim, normalize=True, warmup_cache=False)
    neck = FpnNeck(
        position_encoding=position,
        d_model=preset.prompt_dim,
        backbone_channel_list=list(trunk.channel_list),
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    return ImageEncoder(trunk=trunk, neck=neck, scalp=1)


class Sam2HieraBackbone(Backbone):
    """sam2 ImageEncoder (Hiera + FpnNeck) + SAM PromptEncoder/MaskDecoder, every block's attention wrapped."""

    family = "sam2"

    def __init__(self, preset: HieraPreset, image_size: int) -> None:
        super().__init__()
        if image_size % preset.input_multiple:
            raise ValueError(
                f"image_size {image_size} must be divisible by {preset.input_multiple} for SAM2 Hiera "
                "(4 stages down to stride 32)"
            )
        self.preset = preset
        self.image_size = image_size
        self.prompt_dim = preset.prompt_dim
        self.encoder = build_image_encoder(preset)
        self.prompt_encoder = build_prompt_encoder(preset.prompt_dim, image_size)
        self.mask_decoder = build_mask_decoder(preset.prompt_dim, preset.decoder_mlp_dim, preset.decoder_heads)
        self._wrapped = False
        self.load_report: dict = {"checkpoint": None, "missing": [], "unexpected": []}

    def load_sam2_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load the image encoder of an official SAM2 state dict (before wrapping); returns (missing, unexpected).

        No position-embedding resizing is needed: Hiera interpolates its background pos_embed to the input grid
        on every forward (Hiera._get_pos_embed), and the per-window embedding does not depend on the image size.
        """
        if self._wrapped:
            raise RuntimeError("load the SAM2 checkpoint before wrapping attention for experts")
        part = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        result = self.encoder.load_state_dict(part, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    def wrap_attention(self, experts: tuple[str, ...] = EXPERTS) -> None:
        """Replace each Hiera block's attention by an AdaptedAttention (idempotent)."""
        if self._wrapped:
            return
        for block in self.encoder.trunk.blocks:
            block.attn = AdaptedAttention(HieraAttentionCore(block.attn), experts)
        self._wrapped = True

    def attention_sites(self) -> list[AdaptedAttention]:
        return [block.attn for block in self.encoder.trunk.blocks if isinstance(block.attn, AdaptedAttention)]

    def encode(self, x: torch.Tensor) -> BackboneOutput:
        out = self.encoder(x)
        features = out["backbone_fpn"]  # strides 4, 8, 16 (each prompt_dim wide)
        return BackboneOutput(embedding=out["vision_features"], high_res=list(features[:-1]))


def build_sam2_hiera(preset: HieraPreset, image_size: int, checkpoint: str | Path | None) -> Sam2HieraBackbone:
    """Build the backbone; with a checkpoint, load its image encoder (missing file -> actionable error)."""
    # Resolve first: a missing file fails before building a large encoder for nothing.
    path = resolve_checkpoint(preset, checkpoint) if checkpoint is not None else None
    backbone = Sam2HieraBackbone(preset, image_size)
    if path is not None:
        verify_checksum(path, preset)
        missing, unexpected = backbone.load_sam2_state(read_state_dict(path))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match preset {preset.name!r}: "
                f"missing {missing[:5]}..., unexpected {unexpected[:5]}..."
            )
        backbone.load_report = {
            "checkpoint": str(path),
            "missing": missing,
            "unexpected": unexpected,
            "not_in_checkpoint": list(NOT_IN_CHECKPOINT),
        }
        log.info("loaded SAM2 image encoder from %s at image size %d", path, image_size)
    backbone.wrap_attention()
    return backbone

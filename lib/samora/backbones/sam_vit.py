"""SAM ViT backbone built from segment-anything's module classes at any input size divisible by 16."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos
from torch import nn

from samora.adapters.attention import AdaptedAttention, SplitQKV
from samora.backbones.base import AttentionCore, Backbone, BackboneOutput
from samora.backbones.checkpoints import (
    load_parts,
    read_state_dict,
    resize_for_image_size,
    resolve_checkpoint,
    verify_checksum,
)
from samora.backbones.presets import BackbonePreset
from samora.backbones.sam_decoders import build_mask_decoder, build_prompt_encoder
from samora.config import EXPERTS

log = logging.getLogger(__name__)


class SamViTAttentionCore(AttentionCore):
    """SAM's windowed/global attention with its fused qkv split into q, k, v."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.qkv = SplitQKV(attn.qkv)
        self.proj = attn.proj
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w
        self.width = attn.proj.in_features

    def attend(self, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = qkv.reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, h * w, -1)
        q, k, v = qkv.unbind(0)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            scores = add_decomposed_rel_pos(scores, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        out = scores.softmax(dim=-1) @ v
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class SamViTBackbone(Backbone):
    """ImageEncoderViT + PromptEncoder + SAM's MaskDecoder, with every attention block wrapped for experts."""

    family = "sam"

    def __init__(self, preset: BackbonePreset, image_size: int) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image_size {image_size} must be divisible by 16")
        self.preset = preset
        self.image_size = image_size
        self.prompt_dim = preset.prompt_dim
        self.encoder = ImageEncoderViT(
            img_size=image_size,
            patch_size=16,
            embed_dim=preset.embed_dim,
            depth=preset.depth,
            num_heads=preset.num_heads,
            mlp_ratio=4,
            out_chans=preset.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=preset.window_size,
            global_attn_indexes=preset.global_attn_indexes,
        )
        self.prompt_encoder = build_prompt_encoder(preset.prompt_dim, image_size)
        self.mask_decoder = build_mask_decoder(preset.prompt_dim, preset.decoder_mlp_dim, preset.decoder_heads)
        self._wrapped = False
        self.load_report: dict = {"checkpoint": None, "missing": [], "unexpected": []}

    def load_sam_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load an official-layout state dict (before wrapping); returns (missing, unexpected) keys."""
        if self._wrapped:
            raise RuntimeError("load the SAM checkpoint before wrapping attention for experts")
        state = resize_for_image_size(state, self.preset, self.image_size)
        own = {"image_encoder": self.encoder, "prompt_encoder": self.prompt_encoder, "mask_decoder": self.mask_decoder}
        return load_parts(state, own)

    def wrap_attention(self, experts: tuple[str, ...] = EXPERTS) -> None:
        """Replace each block's attention by an AdaptedAttention (idempotent)."""
        if self._wrapped:
            return
        for block in self.encoder.blocks:
            block.attn = AdaptedAttention(SamViTAttentionCore(block.attn), experts)
        self._wrapped = True

    def attention_sites(self) -> list[AdaptedAttention]:
        return [block.attn for block in self.encoder.blocks if isinstance(block.attn, AdaptedAttention)]

    def encode(self, x: torch.Tensor) -> BackboneOutput:
        return BackboneOutput(embedding=self.encoder(x))


def build_sam_vit(preset: BackbonePreset, image_size: int, checkpoint: str | Path | None) -> SamViTBackbone:
    """Build the backbone; with a checkpoint, load and resize it (missing file -> actionable error)."""
    backbone = SamViTBackbone(preset, image_size)
    if checkpoint is not None:
        path = resolve_checkpoint(preset, checkpoint)
        verify_checksum(path, preset)
        missing, unexpected = backbone.load_sam_state(read_state_dict(path))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match preset {preset.name!r}: "
                f"missing {missing[:5]}..., unexpected {unexpected[:5]}..."
            )
        backbone.load_report = {"checkpoint": str(path), "missing": missing, "unexpected": unexpected}
        log.info("loaded SAM checkpoint %s at image size %d", path, image_size)
    backbone.wrap_attention()
    return backbone

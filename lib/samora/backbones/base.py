"""The interface every backbone family (SAM ViT, SAM2 Hiera, LiteMedSAM) offers to experts, fusion and decoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BackboneOutput:
    """Image embedding for the decoders plus optional higher-resolution features (SAM2)."""

    embedding: torch.Tensor  # (B, prompt_dim, S/stride, S/stride)
    high_res: list[torch.Tensor] | None = None


class AttentionCore(nn.Module):
    """One encoder attention block, split so adapters can change q/k/v and re-run the rest.

    `qkv` must be a module with `q`, `k`, `v` linear children (the LoRA targets); `attend(qkv_out, x)`
    computes the block's attention output from a fused (B, ..., 3*C) projection.
    """

    width: int

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What the block does to its input before the qkv projection (TinyViT: a LayerNorm; SAM: nothing)."""
        return x

    def attend(self, qkv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Backbone(nn.Module):
    """Frozen image encoder + prompt encoder + the SAM mask decoder the heads are initialised from."""

    family: str
    image_size: int
    prompt_dim: int
    encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    load_report: dict

    def attention_sites(self) -> list[nn.Module]:  # pragma: no cover - interface
        """The AdaptedAttention modules, in depth order."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> BackboneOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def take_mask_decoder(self) -> nn.Module:
        """Hand SAM's mask decoder to the heads (it then lives there only, so no weight is stored twice)."""
        decoder = self.mask_decoder
        del self.mask_decoder
        return decoder

    embedding_stride: int = 16  # input pixels per embedding cell (SAM/SAM2: 16; LiteMedSAM: 4)
    prompt_path_trained_on: str = "points and boxes"  # what its pretrained prompt path learned from

    @property
    def embedding_size(self) -> tuple[int, int]:
        return (self.image_size // self.embedding_stride, self.image_size // self.embedding_stride)

    @property
    def pretrained(self) -> bool:
        """Whether the encoder holds real (non-random) weights."""
        return bool(self.load_report.get("checkpoint"))

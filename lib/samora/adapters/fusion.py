"""HL-Attn: bottom-up cross-attention fusion of the three experts' attention residuals (docs/design.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling.transformer import Attention
from torch import nn


def first_divisor(channels: int, choices: Sequence[int] = (8, 6, 4, 3, 2)) -> int:
    """The first of `choices` that divides `channels` (1 if none): attention heads for a width, GroupNorm groups."""
    for choice in choices:
        if channels % choice == 0:
            return choice
    return 1


class CrossAttention(nn.Module):
    """Pre-norm cross-attention with a residual to the query."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        # SAM's decoder attention block: plain q/k/v/out projections, no fast-path switching on requires_grad
        # (nn.MultiheadAttention's fast path gave outputs that differ in the last bits between stages).
        self.attn = Attention(width, heads)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(context)
        return query + self.attn(self.norm_q(query), kv, kv)


class HLAttnFusion(nn.Module):
    """Fuse expert residuals low-to-high: L = CA(patch <- pixel), H = CA(image <- L'), E = Norm(H').

    With width < dim the residuals are projected down first (the reduced variant). The output projection is
    zero-initialised so fine-tuning starts exactly from the frozen model (E contributes nothing at step 0).
    """

    def __init__(self, dim: int, width: int, heads: int = 4) -> None:
        super().__init__()
        self.down = nn.Identity() if width == dim else nn.Linear(dim, width)
        self.low = CrossAttention(width, heads)
        self.high = CrossAttention(width, heads)
        # Gates are sigmoid(logit): start at 0.5, can move towards either input.
        self.gate_low = nn.Parameter(torch.zeros(1))
        self.gate_high = nn.Parameter(torch.zeros(1))
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, residuals: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = residuals["image"].shape
        tokens = {k: self.down(v.reshape(shape[0], -1, shape[-1])) for k, v in residuals.items()}
        low = self.low(tokens["patch"], tokens["pixel"])
        low = tokens["patch"] + torch.sigmoid(self.gate_low) * (low - tokens["patch"])
        high = self.high(tokens["image"], low)
        high = tokens["image"] + torch.sigmoid(self.gate_high) * (high - tokens["image"])
        return self.up(self.norm(high)).reshape(shape)

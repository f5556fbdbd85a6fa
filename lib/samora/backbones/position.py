"""Fixed position codes shared by the backbones (random init) and the SSL decoders."""

from __future__ import annotations

import torch


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine position code (H, W, dim): half the channels encode the row, half the column."""
    quarter = dim // 4
    freqs = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(1, quarter))
    rows = torch.arange(height, dtype=torch.float32)[:, None] * freqs
    cols = torch.arange(width, dtype=torch.float32)[:, None] * freqs
    code = torch.zeros(height, width, dim)
    code[..., 0:quarter] = rows.sin()[:, None, :]
    code[..., quarter : 2 * quarter] = rows.cos()[:, None, :]
    code[..., 2 * quarter : 3 * quarter] = cols.sin()[None, :, :]
    code[..., 3 * quarter : 4 * quarter] = cols.cos()[None, :, :]
    return code

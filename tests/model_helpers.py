"""Helpers shared by the model tests of both backbone families."""

from __future__ import annotations

import torch

from samora.adapters.experts import expert_parameters
from samora.model import SamoraModel


def perturb_expert(model: SamoraModel, name: str, scale: float = 0.5) -> None:
    """Give an expert non-zero, seeded B matrices (an untrained expert is an exact no-op)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in expert_parameters(model.backbone.encoder, name).items():
            if ".lora_B." in key:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)

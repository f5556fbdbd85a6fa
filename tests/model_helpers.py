"""Helpers shared by the model tests of both backbone families."""

from __future__ import annotations

import numpy as np
import torch

from samora.adapters.experts import expert_parameters
from samora.config import EXPERTS
from samora.model import SamoraModel


def perturb_expert(model: SamoraModel, name: str, scale: float = 0.5) -> None:
    """Give an expert non-zero, seeded B matrices (an untrained expert is an exact no-op)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in expert_parameters(model.backbone.encoder, name).items():
            if ".lora_B." in key:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def make_everything_non_trivial(model: SamoraModel) -> SamoraModel:
    """Perturb every expert and the HL-Attn output projections (zero at init; absent with sum fusion), then freeze
    for a save/load check: a round trip that dropped any of them would change the output."""
    for name in EXPERTS:
        perturb_expert(model, name, 0.05)
    model.set_stage("finetune")
    with torch.no_grad():
        for site in model.backbone.attention_sites():
            if site.fusion is not None:
                torch.nn.init.normal_(site.fusion.up.weight, std=0.05)
    return model.eval()


class MemoryCache:
    """The part of SliceCache the stage-1 loop uses, held in memory."""

    data_hash = "synthetic"
    study_ids = ["synthetic"]

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]

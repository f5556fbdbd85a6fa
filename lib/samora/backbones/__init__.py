"""Backbone families behind one interface: SAM ViT (segment-anything)."""

from samora.backbones.base import Backbone, BackboneOutput
from samora.backbones.checkpoints import CheckpointError
from samora.backbones.presets import PRESETS, BackbonePreset
from samora.backbones.sam_vit import SamViTBackbone, build_sam_vit

__all__ = [
    "PRESETS",
    "Backbone",
    "BackboneOutput",
    "BackbonePreset",
    "CheckpointError",
    "SamViTBackbone",
    "build_backbone",
    "build_sam_vit",
]


def build_backbone(preset: str, image_size: int, checkpoint=None) -> Backbone:
    """Registry entry point: build the backbone for a preset name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return build_sam_vit(PRESETS[preset], image_size, checkpoint)

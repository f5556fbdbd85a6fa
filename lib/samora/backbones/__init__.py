"""Backbone families behind one interface: SAM ViT (segment-anything) and SAM2 Hiera (sam2)."""

from samora.backbones.base import Backbone, BackboneOutput
from samora.backbones.checkpoints import CheckpointError
from samora.backbones.presets import PRESETS, BackbonePreset, HieraPreset
from samora.backbones.sam2_hiera import Sam2HieraBackbone, build_sam2_hiera
from samora.backbones.sam_vit import SamViTBackbone, build_sam_vit

__all__ = [
    "PRESETS",
    "Backbone",
    "BackboneOutput",
    "BackbonePreset",
    "CheckpointError",
    "HieraPreset",
    "Sam2HieraBackbone",
    "SamViTBackbone",
    "build_backbone",
    "build_sam2_hiera",
    "build_sam_vit",
]

_BUILDERS = {"sam": build_sam_vit, "sam2": build_sam2_hiera}


def build_backbone(preset: str, image_size: int, checkpoint=None) -> Backbone:
    """Registry entry point: build the backbone for a preset name (the preset names its family)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    return _BUILDERS[spec.family](spec, image_size, checkpoint)

"""Backbone families behind one interface: SAM ViT (segment-anything), SAM2 Hiera (sam2), LiteMedSAM."""

from samora.backbones.base import Backbone, BackboneOutput
from samora.backbones.checkpoints import CheckpointError
from samora.backbones.litemedsam import LiteMedSamBackbone, build_litemedsam
from samora.backbones.presets import PRESETS, BackbonePreset, HieraPreset, LiteMedSamPreset
from samora.backbones.sam2_hiera import Sam2HieraBackbone, build_sam2_hiera
from samora.backbones.sam_vit import SamViTBackbone, build_sam_vit

__all__ = [
    "PRESETS",
    "Backbone",
    "BackboneOutput",
    "BackbonePreset",
    "CheckpointError",
    "HieraPreset",
    "LiteMedSamBackbone",
    "LiteMedSamPreset",
    "Sam2HieraBackbone",
    "SamViTBackbone",
    "build_backbone",
    "build_litemedsam",
    "build_sam2_hiera",
    "build_sam_vit",
]

_BUILDERS = {"sam": build_sam_vit, "sam2": build_sam2_hiera, "litemedsam": build_litemedsam}


def build_backbone(preset: str, image_size: int, checkpoint=None) -> Backbone:
    """Registry entry point: build the backbone for a preset name (the preset names its family)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    return _BUILDERS[spec.family](spec, image_size, checkpoint)

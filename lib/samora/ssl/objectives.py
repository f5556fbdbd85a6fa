"""The three stage-1 objectives (docs/design.md §7), each with its own head; only the active expert and its head train.

- image level (samora.ssl.contrastive): SimCLR-style contrastive learning (NT-Xent on pooled neck features),
  optional teacher distillation;
- patch level (samora.ssl.masked): masked image modelling (MAE family) with a learned mask token and a light
  per-patch pixel decoder;
- pixel level (samora.ssl.denoising): a denoising autoencoder with a light convolutional decoder from the neck
  embedding to full size.

An objective has two halves: a picklable `preparer` that turns one cached slice into the training inputs on the
data-loader side (augmentation, corruption), and `forward(model, batch, generator)` that computes the loss on the
model's device. Randomness in forward comes only from `generator`, so a step is reproducible from its seed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from samora.ssl.contrastive import ContrastiveObjective, TeacherError, check_teacher, load_teacher, nt_xent
from samora.ssl.denoising import DenoisingObjective
from samora.ssl.masked import (
    MaskedImageObjective,
    MaskedPixelObjective,
    normalise_patches,
    patchify,
    random_token_mask,
    sincos_2d,
    unpatchify,
)
from samora.ssl.objective_base import SSLObjective

__all__ = [
    "OBJECTIVES",
    "ContrastiveObjective",
    "DenoisingObjective",
    "MaskedImageObjective",
    "MaskedPixelObjective",
    "SSLObjective",
    "TeacherError",
    "build_objective",
    "check_teacher",
    "load_teacher",
    "normalise_patches",
    "nt_xent",
    "patchify",
    "random_token_mask",
    "sincos_2d",
    "unpatchify",
]

# Level -> objective name recorded in the expert metadata.
OBJECTIVES: dict[str, str] = {
    "image": "contrastive-ntxent",
    "patch": "masked-image-modelling",
    "pixel": "denoising-autoencoder",
}


def build_objective(level: str, model: nn.Module, teacher: nn.Module | None = None, **options: Any) -> SSLObjective:
    """The objective (with a freshly initialised head) for `level` on `model`'s backbone."""
    config = model.config
    encoder = model.backbone.encoder
    neck_channels = model.backbone.prompt_dim
    channels = 3
    if level == "image":
        return ContrastiveObjective(neck_channels, config.image_size, teacher=teacher, **options)
    if teacher is not None:
        raise ValueError(f"a distillation teacher is only supported for the image level, not {level!r}")
    if level == "patch" and model.backbone.family in ("sam2", "litemedsam"):
        return MaskedPixelObjective(neck_channels, patch_size=16, channels=channels, **options)
    if level == "patch":
        width = encoder.patch_embed.proj.out_channels
        patch = encoder.patch_embed.proj.kernel_size[0]
        return MaskedImageObjective(width, patch_size=patch, channels=channels, **options)
    if level == "pixel":
        stride = model.backbone.embedding_stride
        return DenoisingObjective(
            neck_channels, config.image_size, channels=channels, embedding_stride=stride, **options
        )
    raise ValueError(f"unknown SSL level {level!r}; choose one of {tuple(OBJECTIVES)}")

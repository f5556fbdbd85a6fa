"""Pixel level of stage 1: a denoising autoencoder with a light convolutional decoder from the neck embedding to
full size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samora.adapters.fusion import first_divisor
from samora.ssl.augment import SeededAugment, denoising_corruption, geometric_jitter
from samora.ssl.objective_base import SSLObjective

__all__ = ["DenoisingObjective"]


class DenoisingPreparer:
    """(clean target, corrupted input): the corruption is applied to the (optionally flipped) clean slice."""

    def __init__(self, geometry: SeededAugment | None, corruption: SeededAugment) -> None:
        self.geometry = geometry
        self.corruption = corruption

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        clean = self.geometry(image, seed) if self.geometry is not None else image
        # a different stream than the geometry's, so the noise is not correlated with the flip draw
        return clean, self.corruption(clean, seed + 1)


class DenoisingObjective(SSLObjective):
    """Pixel level: encode a noisy, blurred slice; a light conv decoder restores the clean one (sigmoid, [0, 1])."""

    level = "pixel"

    def __init__(
        self,
        embed_channels: int,
        image_size: int,
        channels: int = 3,
        noise_sigma: float = 0.08,
        blur_prob: float = 0.5,
        gradient_weight: float = 0.0,
        min_width: int = 16,
        augment: bool = True,
        embedding_stride: int = 16,
        shuffle: int = 4,
    ) -> None:
        super().__init__()
        self.noise_sigma = noise_sigma
        self.blur_prob = blur_prob
        self.gradient_weight = gradient_weight
        # Convolutions run up to 1/shuffle of the input size; the last 1x1 conv predicts each shuffle x shuffle
        # block of output pixels from one feature vector (pixel shuffle). Full-resolution convolutions cost ~75%
        # of a step on CPU for no measurable gain in this objective.
        stages = int(round(math.log2(embedding_stride / shuffle)))
        layers: list[nn.Module] = []
        width = embed_channels
        for _ in range(stages):
            out = max(min_width, width // 2)
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(width, out, kernel_size=3, padding=1),
                nn.GroupNorm(first_divisor(out, (8, 4, 2)), out),
                nn.GELU(),
            ]
            width = out
        layers += [nn.Conv2d(width, channels * shuffle * shuffle, kernel_size=1), nn.PixelShuffle(shuffle)]
        self.decoder = nn.Sequential(*layers)
        self.image_size = image_size
        self.preparer = DenoisingPreparer(
            geometric_jitter() if augment else None, denoising_corruption(sigma=noise_sigma, blur_prob=blur_prob)
        )

    def restore(self, model: nn.Module, noisy: torch.Tensor) -> torch.Tensor:
        """Reconstruction on [0, 1] (the same scale as the clean target)."""
        out = self.decoder(model.encode(noisy))
        if out.shape[-1] != noisy.shape[-1]:
            out = F.interpolate(out, size=noisy.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(out)

    def forward(
        self, model: nn.Module, batch: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        clean, noisy = batch
        restored = self.restore(model, noisy)
        mse = F.mse_loss(restored, clean)
        out = {"loss": mse, "mse": mse.detach()}
        if self.gradient_weight > 0:
            grad = _gradient_loss(restored, clean)
            out["loss"] = mse + self.gradient_weight * grad
            out["gradient"] = grad.detach()
        return out

    def settings(self) -> dict[str, Any]:
        return {"noise_sigma": self.noise_sigma, "blur_prob": self.blur_prob, "gradient_weight": self.gradient_weight}


def _gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between finite-difference image gradients (keeps edges that plain MSE blurs away)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.mse_loss(dx(prediction), dx(target)) + F.mse_loss(dy(prediction), dy(target))

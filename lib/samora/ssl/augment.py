"""Augmentations for the self-supervised objectives, built from MONAI's array transforms.

Every augmenter takes one slice (C, S, S) in [0, 1] and a seed, and returns a plain tensor of the same shape,
clipped back to [0, 1] (the encoder's input range). They run in the data loader, per sample, so each sample gets
its own random draw and worker processes can share the work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandRotate,
    RandRotate90,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)

__all__ = [
    "SeededAugment",
    "contrastive_views",
    "denoising_corruption",
    "geometric_jitter",
    "prepare_batch",
    "single_thread",
]


class SeededAugment:
    """A MONAI Compose applied to one (C, S, S) slice with an explicit seed; returns a plain tensor in [0, 1]."""

    def __init__(self, transform: Compose, clip: bool = True) -> None:
        self.transform = transform
        self.clip = clip

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        # Reseeding per sample makes every draw a pure function of (run seed, step, position in the batch):
        # a resumed run sees exactly the views the uninterrupted run would have, whatever worker computes them.
        self.transform.set_random_state(seed=int(seed) % (2**32))
        with single_thread():
            out = _plain(self.transform(image))
        return out.clamp_(0.0, 1.0) if self.clip else out

    def views(self, image: torch.Tensor, seed: int, n: int = 2) -> list[torch.Tensor]:
        """`n` independent draws from one seed (the random state advances between them)."""
        self.transform.set_random_state(seed=int(seed) % (2**32))
        with single_thread():
            outs = [_plain(self.transform(image)) for _ in range(n)]
        return [o.clamp_(0.0, 1.0) for o in outs] if self.clip else outs


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny per-sample ops on one intra-op thread: on a busy machine the pool's handshakes cost 10x the op."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prepare_batch(
    slices: Sequence[torch.Tensor],
    preparer: Callable[[torch.Tensor, int], tuple[torch.Tensor, ...]],
    keys: Sequence[tuple[int, int]],
) -> tuple[torch.Tensor, ...]:
    """Prepare slices[i] with seed s for each (i, s) in `keys`; each part of the samples stacked into a batch."""
    with single_thread():
        samples = [preparer(slices[i], seed) for i, seed in keys]
        return tuple(torch.stack(parts) for parts in zip(*samples, strict=True))


def _plain(x: object) -> torch.Tensor:
    """MONAI returns MetaTensors (or numpy for some inputs); the model wants plain float tensors."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x, dtype=torch.float32)


def contrastive_views(
    size: int,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    rotate_degrees: float = 15.0,
    jitter: float = 0.2,
    blur_prob: float = 0.5,
) -> SeededAugment:
    """SimCLR-style view: rot90/flip, small rotation, random resized crop, brightness/contrast jitter, blur."""
    angle = math.radians(rotate_degrees)
    return SeededAugment(
        Compose(
            [
                RandRotate90(prob=0.5, max_k=3, spatial_axes=(0, 1)),
                RandFlip(prob=0.5, spatial_axis=0),
                RandFlip(prob=0.5, spatial_axis=1),
                # zeros padding: after windowing 0 is air, so the rotated corners look like the scanner's background
                RandRotate(range_x=angle, prob=0.5, padding_mode="zeros"),
                # crop side in [0.6, 1.0] of the slice per axis (random aspect), then back to the model's size
                RandScaleCrop(roi_scale=crop_scale[0], max_roi_scale=crop_scale[1], random_size=True),
                Resize((size, size), mode="bilinear"),
                RandAdjustContrast(prob=0.8, gamma=(1.0 - jitter * 1.5, 1.0 + jitter * 2.0)),
                RandScaleIntensity(factors=jitter, prob=0.8),
                RandShiftIntensity(offsets=jitter / 2, prob=0.8),
                RandGaussianSmooth(sigma_x=(0.25, 1.5), sigma_y=(0.25, 1.5), prob=blur_prob),
            ]
        )
    )


def geometric_jitter() -> SeededAugment:
    """Cheap label-free variety for the reconstruction objectives: rot90 and flips only (no resampling blur)."""
    return SeededAugment(
        Compose(
            [
                RandRotate90(prob=0.5, max_k=3, spatial_axes=(0, 1)),
                RandFlip(prob=0.5, spatial_axis=0),
                RandFlip(prob=0.5, spatial_axis=1),
            ]
        )
    )


def denoising_corruption(
    sigma: float = 0.08, blur_prob: float = 0.5, blur_sigma: tuple[float, float] = (0.5, 1.5)
) -> SeededAugment:
    """Corruption for the denoising autoencoder: random blur then Gaussian noise of fixed std `sigma` on [0, 1]."""
    return SeededAugment(
        Compose(
            [
                RandGaussianSmooth(sigma_x=blur_sigma, sigma_y=blur_sigma, prob=blur_prob),
                # sample_std=False: the noise level is exactly `sigma`, as specified, not uniform in [0, sigma]
                RandGaussianNoise(prob=1.0, mean=0.0, std=sigma, sample_std=False),
            ]
        )
    )

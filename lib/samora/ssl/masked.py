"""Patch level of stage 1: masked image modelling (MAE family) with a learned mask token and a light per-patch
pixel decoder; SimMIM-style pixel-space masking for encoders without ViT patch tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samora.distributed.context import context, shard_rows
from samora.ssl.augment import SeededAugment, geometric_jitter
from samora.ssl.objective_base import SSLObjective

__all__ = [
    "MaskedImageObjective",
    "MaskedPixelObjective",
    "PatchDecoder",
    "normalise_patches",
    "patchify",
    "random_token_mask",
    "sincos_2d",
    "unpatchify",
]


def patchify(images: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, C, S, S) -> (B, S/p, S/p, p*p*C), laid out on the same (row, column) grid as the ViT's patch tokens."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by the patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh, gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int = 16, channels: int = 3) -> torch.Tensor:
    """Inverse of patchify: (B, H, W, p*p*C) -> (B, C, H*p, W*p)."""
    b, gh, gw, _ = patches.shape
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Zero-mean, unit-variance pixels within each patch (MAE's normalised-pixel target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    # eps = 1e-4 (std floor 0.01, ~2.5 grey levels of the uint8 cache) keeps quantisation noise in flat patches
    # from being blown up into unit-variance targets that nothing could predict.
    return (patches - mean) / torch.sqrt(var + eps)


def random_token_mask(
    batch: int, height: int, width: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean (B, H, W) mask with exactly round(ratio * H * W) True (masked) tokens per image."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    n = height * width
    n_masked = min(n - 1, max(1, round(ratio * n)))
    noise = torch.rand(batch, n, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < n_masked).reshape(batch, height, width)


def _rank_token_mask(
    batch: int, height: int, width: int, ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """This rank's rows of the global batch's masks: every rank draws them all from the step's generator, so the
    masks do not depend on the number of processes."""
    ctx = context()
    masks = random_token_mask(batch * ctx.world_size, height, width, ratio, generator)
    return torch.stack(shard_rows(masks, ctx))


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


class ReconstructionPreparer:
    """A lightly augmented slice (rot90/flip), or the slice itself."""

    def __init__(self, augment: SeededAugment | None) -> None:
        self.augment = augment

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        return (self.augment(image, seed) if self.augment is not None else image,)


class PatchDecoder(nn.Module):
    """Light decoder over the token grid: LayerNorm -> `depth` x (k x k conv -> GELU) -> 1x1 conv to patch pixels.

    depth=1, kernel_size=1 is exactly a 2-layer MLP per token. Each extra k x k layer widens the neighbourhood a
    masked token's prediction can draw on (depth 2, k 3: 5 x 5 tokens), which is what lets it reach the few visible
    tokens around it when 75% are masked.
    """

    def __init__(self, width: int, hidden_dim: int, out_dim: int, kernel_size: int = 3, depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"decoder depth must be >= 1, got {depth}")
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.ModuleList(
            nn.Conv2d(width if i == 0 else hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2)
            for i in range(depth)
        )
        self.out = nn.Conv2d(hidden_dim, out_dim, 1)
        # Zero output at start: the first loss is exactly the target's variance (1 per non-flat patch), so any
        # fall below it is learned structure, not the decoder shrinking a random initial guess.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) block features -> (B, H, W, out_dim) patch predictions on the same grid."""
        x = self.norm(tokens).permute(0, 3, 1, 2)
        for layer in self.hidden:
            x = F.gelu(layer(x))
        return self.out(x).permute(0, 2, 3, 1)


class MaskedImageObjective(SSLObjective):
    """Patch level: mask ~75% of patch tokens, run the expert-adapted blocks, predict masked patches' pixels.

    The decoder is a light conv stack over the token grid (see PatchDecoder). Neighbourhoods matter because an
    encoder without positional signal (the randomly initialised tiny preset: SAM initialises pos_embed and the
    relative-position tables to zero) gives every masked token of an image the same features, so a per-token MLP
    can only predict one patch per image and the loss cannot fall; a fixed sine-cosine code added before the
    decoder tells it which position it is predicting, as in MAE's decoder.

    Defaults (one hidden decoder layer, rot90/flip on) are the ones that generalise best in bench/mim_reference.py:
    without augmentation the training loss falls much further on a few hundred slices, but by memorising them (the
    loss on a held-out study gets worse); a second decoder layer changes the held-out loss by little.
    """

    level = "patch"

    def __init__(
        self,
        width: int,
        patch_size: int = 16,
        channels: int = 3,
        mask_ratio: float = 0.75,
        hidden_dim: int = 256,
        kernel_size: int = 3,
        decoder_depth: int = 1,
        decoder_position: bool = True,
        norm_eps: float = 1e-4,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        self.mask_ratio = mask_ratio
        self.kernel_size = kernel_size
        self.decoder_depth = decoder_depth
        self.augment = augment
        self.decoder_position = decoder_position
        self.norm_eps = norm_eps
        # Created before the decoder so a seeded head initialises identically whatever the subclass.
        self.mask_token = self._mask_fill(width, channels)
        self.decoder = PatchDecoder(width, hidden_dim, patch_size * patch_size * channels, kernel_size, decoder_depth)
        self.preparer = ReconstructionPreparer(geometric_jitter() if augment else None)

    def _mask_fill(self, width: int, channels: int) -> nn.Parameter:
        """What replaces a masked patch: a learned token of the encoder's width."""
        token = nn.Parameter(torch.zeros(width))
        nn.init.normal_(token, std=0.02)
        return token

    def forward(
        self, model: nn.Module, batch: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        (images,) = batch
        encoder = model.backbone.encoder
        if not all(hasattr(encoder, name) for name in ("patch_embed", "pos_embed", "blocks")):
            raise NotImplementedError("masked image modelling needs a ViT encoder with patch_embed/pos_embed/blocks")
        tokens = encoder.patch_embed(images)  # (B, H, W, C), row-major over the image like patchify()
        b, h, w, width = tokens.shape
        mask = _rank_token_mask(b, h, w, self.mask_ratio, generator).to(tokens.device)
        # The mask token replaces the patch content but still receives the position embedding, so a masked token
        # keeps whatever positional signal the encoder has.
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        if encoder.pos_embed is not None:
            tokens = tokens + encoder.pos_embed
        for block in encoder.blocks:
            tokens = block(tokens)
        return self._masked_loss(tokens, images, mask)

    def _masked_loss(self, tokens: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode (B, H, W, C) features on the mask grid into patch pixels; MSE on the masked patches only."""
        if self.decoder_position:
            tokens = tokens + sincos_2d(tokens.shape[1], tokens.shape[2], tokens.shape[3]).to(tokens)
        prediction = self.decoder(tokens)
        # Prediction and target share the (B, H, W) grid, and one boolean mask selects both: the same tokens are
        # compared in the same order (the reference code gathered them in two different orders, docs/design.md §15.3).
        target = normalise_patches(patchify(images, self.patch_size), self.norm_eps)
        per_patch = (prediction - target).pow(2).mean(dim=-1)
        return {"loss": per_patch[mask].mean()}

    def settings(self) -> dict[str, Any]:
        return {
            "mask_ratio": self.mask_ratio,
            "patch_size": self.patch_size,
            "decoder_kernel": self.kernel_size,
            "decoder_depth": self.decoder_depth,
            "augment": self.augment,
            "norm_eps": self.norm_eps,
        }


class MaskedPixelObjective(MaskedImageObjective):
    """Patch level for encoders without ViT patch tokens (SAM2 Hiera, LiteMedSAM's TinyViT): SimMIM-style masking
    in pixel space.

    These encoders pool or convolve tokens between stages, so masking cannot happen at the token level as in MAE.
    Instead the masked 16x16 patches of the input are replaced by a learned per-channel fill (starting at 0), the
    whole adapted encoder runs, and the same PatchDecoder predicts each masked patch's normalised pixels from the
    embedding on the mask grid (a finer embedding, such as LiteMedSAM's stride 4, is average-pooled onto it).
    `width` is the embedding's channel count.
    """

    def _mask_fill(self, width: int, channels: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(
        self, model: nn.Module, batch: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        (images,) = batch
        b, _, h, w = images.shape
        p = self.patch_size
        mask = _rank_token_mask(b, h // p, w // p, self.mask_ratio, generator).to(images.device)
        pixels = mask.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, None]
        masked = torch.where(pixels, self.mask_token.to(images.dtype), images)
        features = model.encode(masked)
        if features.shape[-1] > mask.shape[-1] and features.shape[-1] % mask.shape[-1] == 0:
            features = F.avg_pool2d(features, features.shape[-1] // mask.shape[-1])
        features = features.permute(0, 2, 3, 1)
        if features.shape[1:3] != mask.shape[1:]:
            raise ValueError(f"embedding grid {tuple(features.shape[1:3])} is not the {p}-pixel mask grid")
        return self._masked_loss(features, images, mask)

"""The three stage-1 objectives (docs/design.md §7), each with its own head; only the active expert and its head train.

- image level: SimCLR-style contrastive learning (NT-Xent on pooled neck features), optional teacher distillation;
- patch level: masked image modelling (MAE family) with a learned mask token and a light per-patch pixel decoder;
- pixel level: a denoising autoencoder with a light convolutional decoder from the neck embedding to full size.

An objective has two halves: a picklable `preparer` that turns one cached slice into the training inputs on the
data-loader side (augmentation, corruption), and `forward(model, batch, generator)` that computes the loss on the
model's device. Randomness in forward comes only from `generator`, so a step is reproducible from its seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samora.distributed.context import context, gather_rows, shard_rows
from samora.ssl.augment import SeededAugment, contrastive_views, denoising_corruption, geometric_jitter

__all__ = [
    "OBJECTIVES",
    "ContrastiveObjective",
    "DenoisingObjective",
    "MaskedImageObjective",
    "MaskedPixelObjective",
    "SSLObjective",
    "TeacherError",
    "build_objective",
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
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(ValueError):
    """A distillation teacher is unusable (wrong file, wrong architecture, or visibly untrained)."""


# ----- small functional pieces ---------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.15) -> torch.Tensor:
    """NT-Xent (SimCLR) loss: each view must pick its partner among the other 2B-1 embeddings."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (B, D) projections of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    # A view is trivially most similar to itself: exclude the diagonal from the softmax.
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)


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


# ----- per-sample preparation (runs in the data loader) ---------------------------------------------------------


class ContrastivePreparer:
    """Two independently augmented views of a slice."""

    def __init__(self, augment: SeededAugment) -> None:
        self.augment = augment

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        return tuple(self.augment.views(image, seed, n=2))


class ReconstructionPreparer:
    """A lightly augmented slice (rot90/flip), or the slice itself."""

    def __init__(self, augment: SeededAugment | None) -> None:
        self.augment = augment

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        return (self.augment(image, seed) if self.augment is not None else image,)


class DenoisingPreparer:
    """(clean target, corrupted input): the corruption is applied to the (optionally flipped) clean slice."""

    def __init__(self, geometry: SeededAugment | None, corruption: SeededAugment) -> None:
        self.geometry = geometry
        self.corruption = corruption

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        clean = self.geometry(image, seed) if self.geometry is not None else image
        # a different stream than the geometry's, so the noise is not correlated with the flip draw
        return clean, self.corruption(clean, seed + 1)


# ----- objectives -----------------------------------------------------------------------------------------------


class SSLObjective(nn.Module):
    """One stage-1 objective: the head's parameters train together with the expert of `level`."""

    level: str = ""
    preparer: Any

    def forward(
        self, model: nn.Module, batch: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        """Loss terms; "loss" is what is minimised."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Hyper-parameters recorded in the expert metadata."""
        return {}


class ContrastiveObjective(SSLObjective):
    """Image level: pooled neck features of two views -> projection MLP -> NT-Xent (+ optional distillation)."""

    level = "image"

    def __init__(
        self,
        embed_channels: int,
        image_size: int,
        temperature: float = 0.15,
        projection_dim: int = 128,
        hidden_dim: int = 256,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        crop_scale: tuple[float, float] = (0.6, 1.0),
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.distill_weight = distill_weight
        self.projector = nn.Sequential(
            nn.Linear(embed_channels, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )
        self.preparer = ContrastivePreparer(contrastive_views(image_size, crop_scale=crop_scale))
        # Kept in a tuple so the frozen teacher is neither trained, nor saved with the head, nor moved by .to().
        self._teacher: tuple[nn.Module, ...] = ()
        self.distill: nn.Module | None = None
        if teacher is not None:
            check_teacher(teacher)
            teacher.eval().requires_grad_(False)
            self._teacher = (teacher,)
            self.distill = nn.Linear(embed_channels, _teacher_width(teacher))

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen distillation teacher, if any."""
        return self._teacher[0] if self._teacher else None

    def forward(
        self, model: nn.Module, batch: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        view1, view2 = batch
        b = view1.shape[0]
        views = torch.cat([view1, view2])
        pooled = model.encode(views).mean(dim=(2, 3))
        # Batch norm and the negatives see the global batch when several ranks train (one process: unchanged).
        ctx = context()
        z = self.projector(torch.cat([gather_rows(pooled[:b], ctx), gather_rows(pooled[b:], ctx)]))
        half = z.shape[0] // 2
        contrastive = nt_xent(z[:half], z[half:], self.temperature)
        out = {"loss": contrastive, "ntxent": contrastive.detach()}
        teacher = self.teacher
        if teacher is not None and self.distill is not None:
            teacher = teacher.to(views.device)
            mean = torch.tensor(_IMAGENET_MEAN, device=views.device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=views.device).view(1, 3, 1, 1)
            with torch.no_grad():
                target = teacher((views - mean) / std).flatten(1)
            distill = (1.0 - F.cosine_similarity(self.distill(pooled), target, dim=1)).mean()
            out["loss"] = contrastive + self.distill_weight * distill
            out["distill"] = distill.detach()
        return out

    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "distill_weight": self.distill_weight if self.teacher else 0.0}


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
                nn.GroupNorm(_groups(out), out),
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


# ----- distillation teacher -------------------------------------------------------------------------------------


def load_teacher(path: str | Path, arch: str = "resnet50") -> nn.Module:
    """A frozen torchvision ResNet (fc removed) from a state-dict file, loaded with weights_only=True.

    Refuses files that do not fit the architecture and teachers that were visibly never trained (docs/design.md §15.4:
    the reference code distilled from randomly initialised teachers).
    """
    import torchvision

    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"{path}: teacher checkpoint not found")
    if not hasattr(torchvision.models, arch) or not arch.startswith("resnet"):
        raise TeacherError(f"unsupported teacher architecture {arch!r} (expected a torchvision resnet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        raise TeacherError(f"{path}: not a plain tensor state dict loadable with weights_only=True ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"{path}: expected a dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches (another depth or width) are raised even with strict=False
        raise TeacherError(f"{path} is not a torchvision {arch} state dict: {str(e).splitlines()[1:2]}") from e
    if result.missing_keys or result.unexpected_keys:
        raise TeacherError(
            f"{path} is not a torchvision {arch} state dict: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    check_teacher(net, source=str(path))
    return net.eval().requires_grad_(False)


def check_teacher(teacher: nn.Module, source: str = "teacher") -> None:
    """Refuse a teacher whose batch-norm statistics were never updated; warn when that cannot be checked."""
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        warnings.warn(
            f"{source}: cannot verify that the distillation teacher is trained (no batch-norm statistics); "
            "distilling from an untrained network is meaningless",
            stacklevel=2,
        )
        return
    untouched = all(
        torch.all(m.running_mean == 0) and torch.all(m.running_var == 1) for m in norms if m.running_mean is not None
    )
    if untouched:
        raise TeacherError(
            f"{source}: the teacher looks untrained (all batch-norm running statistics at their initial values); "
            "distilling from a random network is meaningless (docs/design.md §15.4)"
        )


def _teacher_width(teacher: nn.Module) -> int:
    """Width of the teacher's pooled output, found with one tiny forward pass."""
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        device = next(teacher.parameters()).device
        width = int(teacher(torch.zeros(1, 3, 64, 64, device=device)).flatten(1).shape[1])
    teacher.train(was_training)
    return width


def _gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between finite-difference image gradients (keeps edges that plain MSE blurs away)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.mse_loss(dx(prediction), dx(target)) + F.mse_loss(dy(prediction), dy(target))


def _groups(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1

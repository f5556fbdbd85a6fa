"""H-SAM-style two-stage head (docs/design.md §6): stage 1 is the SAMed head; stage 2 is a prior-guided decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import Attention
from torch import nn

from samora.decoders.samed import SamedHead
from samora.decoders.two_way import dense_pe


class BiasedAttention(Attention):
    """SAM's decoder attention with an additive bias on the attention logits (the mask modulation)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(self._recombine_heads(out))


class MaskGuidedEnhancement(nn.Module):
    """Class-balanced mask-guided attention over class-token/pixel affinities, added through a real gate.

    Prototypes average pixels under each class's prior with per-class normalisation (so small organs weigh as
    much as large ones). The gate is a per-pixel sigmoid, so it varies and learns (the reference code's softmax
    over one channel is constantly 1).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(dim, dim, 1)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Conv2d(dim, dim, 1)
        self.gate = nn.Conv2d(2 * dim, 1, 1)

    def forward(self, embedding: torch.Tensor, tokens: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        b, c, h, w = embedding.shape
        weights = prior.flatten(2)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
        prototypes = torch.einsum("bkn,bcn->bkc", weights, embedding.flatten(2)) + tokens
        query = self.query(embedding).flatten(2).transpose(1, 2)
        affinity = (query @ self.key(prototypes).transpose(1, 2) / math.sqrt(c)).softmax(dim=-1)
        context = (affinity @ self.value(prototypes)).transpose(1, 2).reshape(b, c, h, w)
        gate = torch.sigmoid(self.gate(torch.cat([embedding, context], dim=1)))
        return embedding + gate * self.out(context)


class MaskModulatedBlock(nn.Module):
    """Two-way block whose token->image and image->token attention is biased by the stage-1 log-prior."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = BiasedAttention(dim, heads)
        self.token_to_image = BiasedAttention(dim, heads, downsample_rate=2)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.image_to_token = BiasedAttention(dim, heads, downsample_rate=2)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.mask_strength = nn.Parameter(torch.ones(1))  # learnable: how much the prior steers attention

    def forward(self, tokens, image, token_pe, image_pe, log_prior):
        q = tokens + token_pe
        tokens = self.norms[0](tokens + self.self_attn(q, q, tokens))
        bias = (self.mask_strength * log_prior).unsqueeze(1)  # (B,1,K,N), shared by heads
        tokens = self.norms[1](tokens + self.token_to_image(tokens + token_pe, image + image_pe, image, bias))
        tokens = self.norms[2](tokens + self.mlp(tokens))
        image = self.norms[3](
            image + self.image_to_token(image + image_pe, tokens + token_pe, tokens, bias.transpose(-1, -2))
        )
        return tokens, image


class HierarchicalPixelDecoder(nn.Module):
    """Upsamples stage-2 features, merges stage-1 upscaled features (4x the embedding grid), reaches size S.

    `final_scale` is S over the stage-1 upscaled size: 4 for stride-16 embeddings (SAM, SAM2), 1 for LiteMedSAM's
    stride-4 embedding, whose stage-1 output is already at full resolution (then a 3x3 conv replaces upsampling).
    """

    def __init__(self, dim: int, out_channels: int, final_scale: int = 4) -> None:
        super().__init__()
        c4, c8 = dim // 4, dim // 8
        self.to_quarter = nn.Sequential(
            nn.ConvTranspose2d(dim, c4, 2, 2), LayerNorm2d(c4), nn.GELU(), nn.ConvTranspose2d(c4, c8, 2, 2), nn.GELU()
        )
        self.merge = nn.Sequential(nn.Conv2d(2 * c8, c8, 3, padding=1), LayerNorm2d(c8), nn.GELU())
        if final_scale == 4:
            self.to_full = nn.Sequential(
                nn.ConvTranspose2d(c8, out_channels, 2, 2),
                nn.GELU(),
                nn.ConvTranspose2d(out_channels, out_channels, 2, 2),
            )
        elif final_scale == 1:
            self.to_full = nn.Sequential(
                nn.Conv2d(c8, out_channels, 3, padding=1), nn.GELU(), nn.Conv2d(out_channels, out_channels, 1)
            )
        else:
            raise ValueError(f"final_scale must be 4 or 1, got {final_scale}")

    def forward(self, src: torch.Tensor, stage1_upscaled: torch.Tensor) -> torch.Tensor:
        quarter = self.merge(torch.cat([self.to_quarter(src), stage1_upscaled], dim=1))
        return self.to_full(quarter)


class HsamHead(nn.Module):
    """Two-stage decoding: the SAMed head gives a prior P; a fresh P-guided decoder refines to full resolution."""

    def __init__(
        self,
        sam_decoder: MaskDecoder,
        num_classes: int,
        image_size: int,
        feature_noise: float = 0.1,
        depth: int = 2,
        embedding_stride: int = 16,
    ) -> None:
        super().__init__()
        dim = sam_decoder.transformer_dim
        heads = sam_decoder.transformer.layers[0].self_attn.num_heads
        mlp_dim = sam_decoder.transformer.layers[0].mlp.lin1.out_features
        fine = max(dim // 16, 8)
        self.image_size = image_size
        self.feature_noise = feature_noise
        self.stage1 = SamedHead(sam_decoder, num_classes, image_size)
        self.enhance = MaskGuidedEnhancement(dim)
        self.class_tokens = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList(MaskModulatedBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.final_attn = BiasedAttention(dim, heads, downsample_rate=2)
        self.final_norm = nn.LayerNorm(dim)
        self.pixel_decoder = HierarchicalPixelDecoder(dim, fine, final_scale=embedding_stride // 4)
        self.hyper = nn.ModuleList(MLP(dim, dim, fine, 3) for _ in range(num_classes))

    def forward(self, embedding: torch.Tensor, prompt_encoder: nn.Module) -> dict[str, torch.Tensor]:
        s1 = self.stage1(embedding, prompt_encoder)
        b, c, h, w = embedding.shape
        prior = F.adaptive_avg_pool2d(s1["low_res_logits"].softmax(dim=1), (h, w))
        x = embedding
        if self.training and self.feature_noise > 0:
            x = x + torch.randn_like(x) * self.feature_noise * x.detach().std()
        x = self.enhance(x, s1["mask_tokens"], prior)
        token_pe = self.class_tokens.weight.unsqueeze(0).expand(b, -1, -1)
        tokens = token_pe + s1["mask_tokens"]
        image = x.flatten(2).transpose(1, 2)
        image_pe = dense_pe(prompt_encoder).flatten(2).transpose(1, 2).expand(b, -1, -1)
        log_prior = prior.clamp_min(1e-4).log().flatten(2)
        for block in self.blocks:
            tokens, image = block(tokens, image, token_pe, image_pe, log_prior)
        tokens = self.final_norm(tokens + self.final_attn(tokens + token_pe, image + image_pe, image))
        features = self.pixel_decoder(image.transpose(1, 2).reshape(b, c, h, w), s1["upscaled"])
        hyper = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(self.hyper)], dim=1)
        logits = torch.einsum("bkc,bchw->bkhw", hyper, features)
        return {
            "low_res_logits": s1["low_res_logits"],
            "stage1_logits": s1["logits"],
            "logits": logits,
            "mask_tokens": tokens,
        }

    @staticmethod
    def probabilities(out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Average of both stages' full-size probabilities (the H-SAM inference rule)."""
        return 0.5 * (out["stage1_logits"].softmax(dim=1) + out["logits"].softmax(dim=1))

    @staticmethod
    def stage_weight(epoch: int) -> float:
        """Weight w of the full-resolution loss: (1-w)*L_low + w*L_full, w = 0.6^(0.99^epoch)."""
        return 0.6 ** (0.99**epoch)

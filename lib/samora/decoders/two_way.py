"""Batched two-way decoding shared by every head: one token set per image, never silently broadcast."""

from __future__ import annotations

import torch
from torch import nn


def run_two_way(
    transformer: nn.Module,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    dense: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SAM's TwoWayTransformer with per-image tokens; returns (tokens_out (B,T,C), image_out (B,C,h,w)).

    SAM's own predict_masks repeats the image for every prompt; with a batch of images and one token set
    each, that yields B*B pairs (or a silent broadcast of batch-1 prompts). Here every tensor is expanded
    explicitly to the image batch and mismatches raise.
    """
    b, c, h, w = image_embedding.shape
    if tokens.shape[0] != b:
        raise ValueError(f"tokens batch {tokens.shape[0]} != image batch {b}; expand prompts per image explicitly")
    src = image_embedding if dense is None else image_embedding + dense.expand(b, -1, -1, -1)
    pos = image_pe.expand(b, -1, -1, -1)
    hs, src_out = transformer(src, pos, tokens)
    return hs, src_out.transpose(1, 2).reshape(b, c, h, w)


def dense_pe(prompt_encoder: nn.Module) -> torch.Tensor:
    """prompt_encoder.get_dense_pe(), computed once per encoder state: it depends only on a frozen random buffer
    and the embedding size, and costs ~10 ms on a CPU (10% of a slice's decode)."""
    gaussian = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    key = (gaussian.data_ptr(), gaussian._version, gaussian.device, tuple(prompt_encoder.image_embedding_size))
    cached = prompt_encoder.__dict__.get("_dense_pe_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, prompt_encoder.get_dense_pe())
        prompt_encoder.__dict__["_dense_pe_cache"] = cached  # a plain attribute: no buffer, no state_dict entry
    return cached[1]


def empty_prompt(prompt_encoder: nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-free embeddings: no sparse tokens and the learned no-mask dense embedding, per image."""
    sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
    return sparse.expand(batch, -1, -1), dense.expand(batch, -1, -1, -1)


def decode_masks(
    decoder: nn.Module, embedding: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A SAM MaskDecoder's full pass (tokens, two-way transformer, hypernetworks) for a batch of images.

    Returns every mask token's low-res logits (B, num_mask_tokens, S/4, S/4), the IoU scores, the mask
    tokens and the upscaled image features (the H-SAM stage-2 decoder reuses the last two).
    """
    b = embedding.shape[0]
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0).unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat([tokens, sparse], dim=1)
    hs, src = run_two_way(decoder.transformer, embedding, image_pe, tokens, dense)
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens]
    upscaled = decoder.output_upscaling(src)
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    return {
        "low_res_logits": torch.einsum("bkc,bchw->bkhw", hyper, upscaled),
        "iou": decoder.iou_prediction_head(hs[:, 0]),
        "mask_tokens": mask_tokens,
        "upscaled": upscaled,
    }

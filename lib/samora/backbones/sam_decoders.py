"""SAM's prompt encoder and mask decoder (segment-anything classes), shared by every backbone family."""

from __future__ import annotations

from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer


def build_prompt_encoder(prompt_dim: int, image_size: int) -> PromptEncoder:
    """Prompt encoder for a stride-16 embedding of an `image_size` input."""
    grid = image_size // 16
    return PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def build_mask_decoder(prompt_dim: int, mlp_dim: int, heads: int) -> MaskDecoder:
    """SAM's two-way mask decoder, the module the prompt-free and prompt heads are initialised from."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=mlp_dim, num_heads=heads),
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=prompt_dim,
    )

"""SAMed-style prompt-free multi-class head: K mask tokens (background included) on SAM's mask decoder."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from torch import nn

from samora.decoders.two_way import decode_masks, dense_pe, empty_prompt


class SamedHead(nn.Module):
    """Prompt-free decoder. Transformer and upscaling start from SAM's decoder; tokens, hypernetworks and the
    IoU head are re-initialised for `num_classes` outputs."""

    def __init__(self, sam_decoder: MaskDecoder, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.decoder = MaskDecoder(
            transformer_dim=sam_decoder.transformer_dim,
            transformer=copy.deepcopy(sam_decoder.transformer),
            num_multimask_outputs=num_classes - 1,
            iou_head_depth=len(sam_decoder.iou_prediction_head.layers),
            iou_head_hidden_dim=sam_decoder.iou_prediction_head.layers[0].out_features,
        )
        self.decoder.output_upscaling.load_state_dict(sam_decoder.output_upscaling.state_dict())

    # Parts of SAM's decoder that a checkpoint cannot fill because their size depends on num_classes.
    REINITIALISED = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head", "iou_token")

    def forward(self, embedding: torch.Tensor, prompt_encoder: nn.Module) -> dict[str, torch.Tensor]:
        sparse, dense = empty_prompt(prompt_encoder, embedding.shape[0])
        out = decode_masks(self.decoder, embedding, dense_pe(prompt_encoder), sparse, dense)
        size = (self.image_size, self.image_size)
        out["logits"] = F.interpolate(out["low_res_logits"], size=size, mode="bilinear", align_corners=False)
        return out

    @staticmethod
    def probabilities(out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-class probabilities at full model resolution."""
        return out["logits"].softmax(dim=1)

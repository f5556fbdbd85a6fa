"""The prompt path: points and boxes through SAM's prompt encoder onto a cached image embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from torch import nn

from samora.decoders.two_way import decode_masks, dense_pe


class PromptHead(nn.Module):
    """SAM's own mask decoder for interactive refinement; decodes per image, so batches never cross-broadcast."""

    def __init__(self, sam_decoder: MaskDecoder, image_size: int) -> None:
        super().__init__()
        self.decoder = sam_decoder
        self.image_size = image_size

    def forward(
        self,
        embedding: torch.Tensor,
        prompt_encoder: nn.Module,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """points: (coords (B,N,2) as x,y in model-input pixels, labels (B,N) 1 fg / 0 bg / -1 pad);
        boxes: (B,4) x0,y0,x1,y1. Returns all 4 masks and IoU scores."""
        b = embedding.shape[0]
        if points is None and boxes is None:
            raise ValueError("a prompt needs points or a box")
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=None)
        if sparse.shape[0] != b:
            raise ValueError(f"prompt batch {sparse.shape[0]} != image batch {b}")
        return decode_masks(self.decoder, embedding, dense_pe(prompt_encoder), sparse, dense)

    def best_mask(self, out: dict[str, torch.Tensor], multimask: bool = False) -> torch.Tensor:
        """One full-size logit map per image: token 0, or the best-scored of tokens 1-3 for ambiguous clicks."""
        low = out["low_res_logits"]
        if multimask:
            idx = out["iou"][:, 1:].argmax(dim=1) + 1
            chosen = low[torch.arange(low.shape[0]), idx].unsqueeze(1)
        else:
            chosen = low[:, :1]
        return F.interpolate(chosen, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

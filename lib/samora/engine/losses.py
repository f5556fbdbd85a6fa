"""Stage-2 losses: a*CE + (1-a)*Dice over all classes (MONAI DiceCELoss), at the logits' own resolution."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss

from samora.data import resize_label
from samora.decoders.hsam import HsamHead


class SegmentationLoss(torch.nn.Module):
    """DiceCE on full-size logits; for H-SAM also on the low-res stage-1 logits, weighted by epoch."""

    def __init__(self, ce_weight: float = 0.2) -> None:
        super().__init__()
        # Dice over the whole batch per class (as SAMed's loss): per slice, every class absent from it adds a
        # saturated ~1 term, which left the heads predicting background only after a few cached-mode epochs
        self.loss = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_ce=ce_weight, lambda_dice=1 - ce_weight, batch=True
        )

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor, epoch: int, hsam: bool) -> torch.Tensor:
        full = self.loss(out["logits"], labels[:, None])
        if not hsam:
            return full
        # The low-res loss uses the label resized (nearest) to the logits' resolution, never the full label.
        low_labels = resize_label(labels, out["low_res_logits"].shape[-1])
        low = self.loss(out["low_res_logits"], low_labels[:, None])
        w = HsamHead.stage_weight(epoch)
        return (1 - w) * low + w * full


class PromptLoss(torch.nn.Module):
    """Binary Dice + BCE for the prompt path's single mask."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True)
        self.bce = torch.nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)

"""Evaluation per volume and class: Dice and HD95 in both conventions of docs/design.md §14 (MONAI metrics)."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance


def _onehot(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(mask, dtype=torch.float32)[None, None]


def class_metrics(pred: np.ndarray, truth: np.ndarray, label: int, spacing=None) -> dict[str, float]:
    """Dice and HD95 of one class in both conventions.

    samed_*: SAMed/H-SAM convention in voxel units (both present: computed; prediction on an absent class:
    dice 1, hd95 0; empty prediction of a present class: 0, 0). dice/hd95_mm: NaN when the class is absent
    from the truth, HD95 in mm with the voxel spacing (inf when the prediction is empty).
    """
    p, t = pred == label, truth == label
    if t.any() and p.any():
        dice = float(compute_dice(_onehot(p), _onehot(t), include_background=True)[0, 0])
        hd_vox = float(compute_hausdorff_distance(_onehot(p), _onehot(t), include_background=True, percentile=95)[0, 0])
        hd_mm = float(
            compute_hausdorff_distance(_onehot(p), _onehot(t), include_background=True, percentile=95, spacing=spacing)[
                0, 0
            ]
        )
        return {"samed_dice": dice, "samed_hd95": hd_vox, "dice": dice, "hd95_mm": hd_mm}
    if p.any():  # predicted but absent in truth
        return {"samed_dice": 1.0, "samed_hd95": 0.0, "dice": math.nan, "hd95_mm": math.nan}
    if t.any():  # missed entirely
        return {"samed_dice": 0.0, "samed_hd95": 0.0, "dice": 0.0, "hd95_mm": math.inf}
    return {"samed_dice": 0.0, "samed_hd95": 0.0, "dice": math.nan, "hd95_mm": math.nan}


def volume_metrics(pred: np.ndarray, truth: np.ndarray, labels: dict[str, int], spacing=None) -> dict:
    """Per-class metrics plus the mean Dice over classes present in the truth."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    per_class = {name: class_metrics(pred, truth, idx, spacing) for name, idx in labels.items()}
    present = [m["dice"] for m in per_class.values() if not math.isnan(m["dice"])]
    return {"classes": per_class, "mean_dice": float(np.mean(present)) if present else math.nan}


def mean_dice(pred: np.ndarray, truth: np.ndarray, labels: dict[str, int]) -> float:
    """Mean Dice over the classes present in the truth (NaN if none)."""
    scores = []
    for idx in labels.values():
        t = truth == idx
        if not t.any():
            continue
        p = pred == idx
        scores.append(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores)) if scores else math.nan

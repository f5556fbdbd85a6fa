"""Clicks answered through box prompts, for prompt paths that learned from boxes only.

LiteMedSAM's prompt path was trained on boxes: given a click on the liver of a CT it answers a blob of a few dozen
pixels (predicted IoU ~0.2), on every organ of the shared CT (docs/benchmarks.md section 4.11). Its box answers are
good and its predicted IoU tells a box that frames a structure from one that cuts it. So a click-only slice prompt is
answered by square boxes of a few sizes around the positive clicks, decoded in one batch; the best-scored mask that
holds every positive click and no negative one wins; it is then refit to its own bounding box (plus a margin, pushed
out where the box cut it), at most REFITS times, while the model is surer of the refit mask. Clicks given with a box
are correction clicks: the box alone answers when its mask already agrees with them (given to the model, clicks
lower its box answers: mean Dice 0.893 -> 0.817 with a positive click in the middle of 8 organs' truth boxes), the
box with the clicks where it does not and agrees better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from samora.serving.mask_scores import mask_stability

# half-sides (model pixels, 256 grid) of the candidate boxes around the clicks: a vessel, a kidney, a liver. Chosen
# on the shared CT's clicks (48 over 16 structures, benchmarks.md section 4.11): more or larger boxes found large wrong
# structures as often as they helped, and each box costs one decoder pass (~50 ms on 2 cores)
HALF_SIDES_PX = (10.0, 24.0, 54.0)
REFIT_MARGIN_PX = 3.0  # around the chosen mask's box (the propagation margin: organs' edges are soft)
CUT_PX = 2.0  # a mask this close to its box's edge was cut by it
REFITS = 2


@dataclass
class BoxAnswer:
    """The chosen mask's logits on the model grid (S, S), the box that gave them, and the model's predicted IoU."""

    logits: torch.Tensor
    box: np.ndarray
    iou: float


def answers_clicks_through_boxes(model, coords: np.ndarray) -> bool:
    """Whether a slice prompt has clicks and the prompt path is a pretrained box-trained one."""
    return len(coords) > 0 and model.backbone.prompt_path_trained_on == "boxes" and model.backbone.pretrained


def click_answer(model, embedding: torch.Tensor, coords, labels, box, inner) -> BoxAnswer | None:
    """The answer to a slice prompt with clicks on a box-trained prompt path (model-pixel clicks and box), or None
    where the prompt path's own answer to the clicks should stand (no positive click and no box, or no box holds
    the clicks)."""
    if box is not None:
        return corrected_box_answer(model, embedding, coords, labels, np.asarray(box, np.float32))
    if not (labels == 1).any():
        return None
    return box_answer(model, embedding, coords, labels, inner)


def candidate_boxes(positives: np.ndarray, inner: tuple[int, int]) -> np.ndarray:
    """(len(HALF_SIDES_PX), 4) boxes x0, y0, x1, y1 around the positive clicks' bounding box, inside the slice."""
    lo, hi = positives.min(axis=0), positives.max(axis=0)
    boxes = [np.concatenate([lo - s, hi + s]) for s in HALF_SIDES_PX]
    return np.stack([clip_box(b, inner) for b in boxes]).astype(np.float32)


def clip_box(box: np.ndarray, inner: tuple[int, int]) -> np.ndarray:
    h, w = inner
    return np.clip(box, 0, [w, h, w, h]).astype(np.float32)


def holding_clicks(mask: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray | None:
    """The connected parts of `mask` (S, S) that hold a positive click, or None when a positive click lies outside
    them or a negative one inside."""
    parts, _ = ndimage.label(mask)
    size = mask.shape[0]

    def at(points: np.ndarray) -> np.ndarray:
        cells = np.clip(np.floor(points).astype(int), 0, size - 1)
        return parts[cells[:, 1], cells[:, 0]]

    hit = at(positives)
    if (hit == 0).any():
        return None
    if len(negatives) and np.isin(at(negatives), hit).any():
        return None
    return np.isin(parts, hit)


def agreeing_clicks(mask: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> int:
    """How many clicks the mask (S, S) agrees with: positive ones inside it, negative ones outside."""
    cells = np.clip(np.floor(coords).astype(int), 0, mask.shape[0] - 1)
    return int((mask[cells[:, 1], cells[:, 0]] == (labels == 1)).sum())


def corrected_box_answer(model, embedding, coords, labels, box: np.ndarray) -> BoxAnswer:
    """The box's own answer where its mask agrees with every click; else the answer to the box with the clicks
    where that one agrees with more of them."""
    logits, ious = decode_boxes(model, embedding, box[None])
    answer = BoxAnswer(logits[0], box, float(ious[0]))
    agreed = agreeing_clicks(logits[0].cpu().numpy() > 0, coords, labels)
    if agreed == len(coords):
        return answer
    points = (
        torch.as_tensor(coords, device=embedding.device)[None],
        torch.as_tensor(labels, device=embedding.device)[None],
    )
    out = model.prompt(embedding, points=points, boxes=torch.as_tensor(box, device=embedding.device)[None])
    with_clicks = model.prompt_head.best_mask(out)[0, 0].float()
    if agreeing_clicks(with_clicks.cpu().numpy() > 0, coords, labels) > agreed:
        return BoxAnswer(with_clicks, box, float(out["iou"][0, 0]))
    return answer


def decode_boxes(model, embedding: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Mask logits (B, S, S) on the model grid and predicted IoUs (B,) of B boxes on one slice's embedding."""
    batch = embedding.expand(len(boxes), -1, -1, -1)
    out = model.prompt(batch, boxes=torch.as_tensor(boxes, device=embedding.device))
    logits = model.prompt_head.best_mask(out)[:, 0]
    return logits.float(), out["iou"][:, 0].float().cpu().numpy()


def box_answer(model, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray, inner) -> BoxAnswer | None:
    """The best box answer to a click-only prompt (model-pixel clicks), or None when no candidate holds the clicks
    (the caller then falls back to the prompt path's own answer to the clicks)."""
    positives, negatives = coords[labels == 1], coords[labels == 0]
    boxes = candidate_boxes(positives, inner)
    logits, ious = decode_boxes(model, embedding, boxes)
    best: BoxAnswer | None = None
    best_kept = None
    for i in range(len(boxes)):
        kept = holding_clicks(logits[i].cpu().numpy() > 0, positives, negatives)
        if kept is not None and (best is None or ious[i] > best.iou):
            best, best_kept = BoxAnswer(logits[i], boxes[i], float(ious[i])), kept
    if best is None:
        return None
    return refit(model, embedding, best, best_kept, positives, negatives, inner)


def refit(model, embedding, answer: BoxAnswer, kept: np.ndarray, positives, negatives, inner) -> BoxAnswer:
    """Up to REFITS times: the answer to the chosen mask's own box plus a margin, pushed out by half the box on
    each side where the mask reaches the box's edge (the box cut the structure), kept where the model is surer of it
    (IoU x stability) and it still holds the clicks."""
    score = answer.iou * mask_stability(answer.logits.cpu().numpy())
    for _ in range(REFITS):
        box = refit_box(kept, answer.box, inner)
        logits, ious = decode_boxes(model, embedding, box[None])
        new_kept = holding_clicks(logits[0].cpu().numpy() > 0, positives, negatives)
        new_score = float(ious[0]) * mask_stability(logits[0].cpu().numpy())
        if new_kept is None or new_score <= score:
            break
        answer, kept, score = BoxAnswer(logits[0], box, float(ious[0])), new_kept, new_score
    return answer


def refit_box(kept: np.ndarray, box: np.ndarray, inner) -> np.ndarray:
    ys, xs = np.nonzero(kept)
    fit = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    half = (box[2:] - box[:2]) / 2
    cut = np.abs(fit - box) <= CUT_PX
    push = np.where(cut, np.concatenate([half, half]), REFIT_MARGIN_PX)
    return clip_box(fit + np.array([-1, -1, 1, 1]) * push, inner)

"""Clicks answered through box prompts, for prompt paths that learned from boxes only.

LiteMedSAM's prompt path was trained on boxes: given a click on the liver of a CT it answers a blob of a few dozen
pixels (predicted IoU ~0.2), on every organ of the shared CT (docs/benchmarks.md section 4.11). Its box answers are
good and its predicted IoU tells a box that frames a structure from one that cuts it. So the first click of a slice
is answered by square boxes of a few sizes around it, decoded in one batch; the best-scored mask that holds the click
wins; it is then refit to its own bounding box (plus a margin, pushed out where the box cut it), at most REFITS
times, while the model is surer of the refit mask. Further clicks on the slice correct that answer's box, one at a
time: a positive click the mask misses grows the box to hold it, a negative click inside the mask cuts the box on
one side just past it (docs/benchmarks.md section 4.13: re-framing every click from scratch made corrections lower
the Dice); where the edit does not honour a click the annotator repeats, the answer to a small box around it is
added or taken out.
Clicks given with a box are correction clicks too, and are never handed to the model (given to it, clicks lower
its box answers: mean Dice 0.893 -> 0.817 with a positive click in the middle of 8 organs' truth boxes): the drawn
box's answer gets their local parts added or taken out (corrected_box_answer; docs/benchmarks.md section 4.13).
"""

from __future__ import annotations

import functools
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
GROW_PX = 10.0  # a positive correction click is held by the box with this margin (the smallest candidate's)
CUT_PAST_PX = 1.0  # a negative correction click is left this far outside the cut box
# a correction keeps at least this share of the mask it corrects: a drawn box's answer less a negative click's local
# part, and a grown box's answer (below it, the grown box found another structure)
MIN_KEPT = 0.5


@dataclass
class BoxAnswer:
    """The chosen mask's logits on the model grid (S, S), the box that gave them, and the model's predicted IoU."""

    logits: torch.Tensor
    box: np.ndarray
    iou: float


def answers_clicks_through_boxes(model, coords: np.ndarray) -> bool:
    """Whether a slice prompt has clicks and the prompt path is a pretrained box-trained one."""
    return len(coords) > 0 and model.backbone.prompt_path_trained_on == "boxes" and model.backbone.pretrained


def click_answer(model, embedding: torch.Tensor, coords, labels, box, inner, memo=None) -> BoxAnswer | None:
    """The answer to a slice prompt with clicks on a box-trained prompt path (model-pixel clicks and box), or None
    where the prompt path's own answer to the clicks should stand (no positive click and no box, or no box holds
    the clicks). `memo(key, compute)`, where given, keeps the answer after each click between requests, so that a
    correction click costs only its own edit."""
    remember = memo or _compute
    if box is not None:
        box = np.asarray(box, np.float32)
        return corrected_box_answer(model, embedding, coords, labels, box, inner, remember)
    positives, negatives = coords[labels == 1], coords[labels == 0]
    if not len(positives):
        return None
    first = remember(
        clicks_key(positives[:1], negatives[:0]),
        functools.partial(box_answer, model, embedding, positives[:1], np.ones(1, np.float32), inner),
    )
    if first is None:
        return box_answer(model, embedding, coords, labels, inner)
    return corrected_click_answer(model, embedding, first, positives, negatives, inner, remember)


def _compute(key: bytes, compute):
    return compute()


def clicks_key(positives: np.ndarray, negatives: np.ndarray, box: np.ndarray | None = None) -> bytes:
    """The bytes that name the clicks an answer has taken in, and the drawn box it started from (if any)."""
    start = b"c" if box is None else b"b" + np.asarray(box, np.float32).tobytes()
    return start + np.asarray(positives, np.float32).tobytes() + b"|" + np.asarray(negatives, np.float32).tobytes()


def in_turn(answer: BoxAnswer, positives, negatives, add, take_out, remember=_compute, box=None, first=0) -> BoxAnswer:
    """`answer` corrected by the clicks in turn, positive ones from the `first` on (add(answer, m)), then negative
    ones (take_out(answer, n)); each step's answer comes from `remember` under the clicks taken in so far (and the
    drawn box), so that a request repeating earlier clicks computes only its new ones."""
    for m in range(first, len(positives)):
        answer = remember(clicks_key(positives[: m + 1], negatives[:0], box), functools.partial(add, answer, m))
    for n in range(len(negatives)):
        answer = remember(clicks_key(positives, negatives[: n + 1], box), functools.partial(take_out, answer, n))
    return answer


def candidate_boxes(positives: np.ndarray, inner: tuple[int, int]) -> np.ndarray:
    """(len(HALF_SIDES_PX), 4) boxes x0, y0, x1, y1 around the positive clicks' bounding box, inside the slice."""
    lo, hi = positives.min(axis=0), positives.max(axis=0)
    boxes = [np.concatenate([lo - s, hi + s]) for s in HALF_SIDES_PX]
    return np.stack([clip_box(b, inner) for b in boxes]).astype(np.float32)


def in_box(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(N,) whether each model-pixel point (N, 2), x, y, lies in the box x0, y0, x1, y1 (edges included)."""
    return (points >= box[:2]).all(axis=1) & (points <= box[2:]).all(axis=1)


def clip_box(box: np.ndarray, inner: tuple[int, int]) -> np.ndarray:
    h, w = inner
    return np.clip(box, 0, [w, h, w, h]).astype(np.float32)


def holding_clicks(mask: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray | None:
    """The connected parts of `mask` (S, S) that hold a positive click, or None when a positive click lies outside
    them or a negative one inside."""
    parts, _ = ndimage.label(mask)

    def at(points: np.ndarray) -> np.ndarray:
        rows, cols = cells(points, mask.shape[0])
        return parts[rows, cols]

    hit = at(positives)
    if (hit == 0).any():
        return None
    if len(negatives) and np.isin(at(negatives), hit).any():
        return None
    return np.isin(parts, hit)


def cells(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, cols) of the model-grid cells under model-pixel points (N, 2) given as x, y."""
    xy = np.clip(np.floor(points).astype(int), 0, size - 1)
    return xy[:, 1], xy[:, 0]


def corrected_box_answer(model, embedding, coords, labels, box: np.ndarray, inner, remember=_compute) -> BoxAnswer:
    """The drawn box's answer corrected by its clicks in turn, positive ones first. The drawn box is the annotator's
    extent, so it is never cut: a positive click the mask misses adds its local part where it lies inside the box
    (growing a tight box past it took in neighbours) and grows the box where it lies outside; a negative click inside
    the mask takes its local part out, unless that would remove half of the mask (on a small structure the local
    answer is the structure itself)."""
    positives, negatives = coords[labels == 1], coords[labels == 0]

    def add(answer: BoxAnswer, m: int) -> BoxAnswer:
        click = positives[m]
        if holds(answer, click):
            return answer
        if in_box(click[None], box).all():
            return with_local_part(model, embedding, answer, click, inner)
        return grown_answer(model, embedding, answer, click, inner, near_any(click, positives[:m]))

    def take_out(answer: BoxAnswer, n: int) -> BoxAnswer:
        if not holds(answer, negatives[n]):
            return answer
        less = without_local_part(model, embedding, answer, negatives[n], positives, inner)
        return less if kept_share(answer, less) >= MIN_KEPT else answer

    start = positives[:0], negatives[:0]
    answer = remember(clicks_key(*start, box), functools.partial(decoded_answer, model, embedding, box))
    return in_turn(answer, positives, negatives, add, take_out, remember, box)


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
        refitted = decoded_answer(model, embedding, refit_box(kept, answer.box, inner))
        logits = refitted.logits.cpu().numpy()
        new_kept = holding_clicks(logits > 0, positives, negatives)
        new_score = refitted.iou * mask_stability(logits)
        if new_kept is None or new_score <= score:
            break
        answer, kept, score = refitted, new_kept, new_score
    return answer


def refit_box(kept: np.ndarray, box: np.ndarray, inner) -> np.ndarray:
    ys, xs = np.nonzero(kept)
    fit = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    half = (box[2:] - box[:2]) / 2
    cut = np.abs(fit - box) <= CUT_PX
    push = np.where(cut, np.concatenate([half, half]), REFIT_MARGIN_PX)
    return clip_box(fit + np.array([-1, -1, 1, 1]) * push, inner)


def corrected_click_answer(
    model, embedding, answer: BoxAnswer, positives, negatives, inner, remember=_compute
) -> BoxAnswer:
    """The first click's answer corrected by the other clicks in turn, positive ones first (grown_answer), then
    negative ones (answer_without); each step's answer comes from `remember` under the clicks taken in so far."""

    def add(answer: BoxAnswer, m: int) -> BoxAnswer:
        insisted = near_any(positives[m], positives[:m])
        return grown_answer(model, embedding, answer, positives[m], inner, insisted)

    def take_out(answer: BoxAnswer, n: int) -> BoxAnswer:
        insisted = near_any(negatives[n], negatives[:n])
        return answer_without(model, embedding, answer, negatives[n], positives, inner, insisted)

    return in_turn(answer, positives, negatives, add, take_out, remember, first=1)


def near_any(click: np.ndarray, earlier: np.ndarray) -> bool:
    """Whether an earlier click of the same sign lies within the local box's half-side of this one: the annotator
    insists on that place."""
    return bool(len(earlier)) and bool((np.abs(earlier - click).max(axis=1) <= HALF_SIDES_PX[0]).any())


def grown_answer(model, embedding, answer: BoxAnswer, click: np.ndarray, inner, insisted: bool) -> BoxAnswer:
    """The answer to its box grown to hold a positive click with GROW_PX, where the mask misses the click. Where the
    grown box's answer loses most of the old mask, it is another structure: the click's local part is added to the
    old answer instead (a colon loop of the MR became the bowel around it). Where the grown box's answer still
    leaves the click out it stands (keeping the old answer scored lower), unless the annotator insisted on the
    place: then the click's local part is added (with_local_part; adding it at the first try spoilt answers whose
    missed rim SAM sees as a neighbour, docs/benchmarks.md section 4.13)."""
    if holds(answer, click):
        return answer
    lo, hi = np.minimum(answer.box[:2], click - GROW_PX), np.maximum(answer.box[2:], click + GROW_PX)
    grown = decoded_answer(model, embedding, clip_box(np.concatenate([lo, hi]), inner))
    if kept_share(answer, grown) < MIN_KEPT:
        return with_local_part(model, embedding, answer, click, inner)
    if holds(grown, click) or not insisted:
        return grown
    return with_local_part(model, embedding, grown, click, inner)


def answer_without(model, embedding, answer, click: np.ndarray, positives, inner, insisted: bool) -> BoxAnswer:
    """The answer with its box cut to leave out a negative click inside the mask (cut_answer). Where no cut does, the
    answer as it was, or, where the annotator insisted on the place, with the click's local part taken out
    (without_local_part)."""
    if not holds(answer, click):
        return answer
    cut = cut_answer(model, embedding, answer, click, positives)
    if cut is not None:
        return cut
    return without_local_part(model, embedding, answer, click, positives, inner) if insisted else answer


def cut_answer(model, embedding, answer: BoxAnswer, negative: np.ndarray, positives: np.ndarray) -> BoxAnswer | None:
    """The best-scored answer to the box with one side moved just past a negative click, among the sides whose cut
    keeps every positive click in the box, whose mask leaves out the negative click and holds the positive ones."""
    cuts = []
    for side in range(4):
        cut = answer.box.copy()
        cut[side] = negative[side % 2] + (CUT_PAST_PX if side < 2 else -CUT_PAST_PX)
        if (cut[2:] - cut[:2] > CUT_PX).all() and in_box(positives, cut).all():
            cuts.append(cut)
    if not cuts:
        return None
    logits, ious = decode_boxes(model, embedding, np.stack(cuts))
    best = None
    for i, cut in enumerate(cuts):
        candidate = BoxAnswer(logits[i], cut, float(ious[i]))
        if not holds(candidate, negative) and all(holds(candidate, p) for p in positives):
            best = candidate if best is None or candidate.iou > best.iou else best
    return best


def decoded_answer(model, embedding, box: np.ndarray) -> BoxAnswer:
    logits, ious = decode_boxes(model, embedding, box[None])
    return BoxAnswer(logits[0], box, float(ious[0]))


def kept_share(before: BoxAnswer, after: BoxAnswer) -> float:
    """The share of `before`'s mask that `after`'s mask keeps (1 for an empty one)."""
    old = before.logits > 0
    return float((old & (after.logits > 0)).sum()) / max(int(old.sum()), 1)


def holds(answer: BoxAnswer, click: np.ndarray) -> bool:
    """Whether the answer's mask covers a model-pixel click."""
    rows, cols = cells(click[None], answer.logits.shape[-1])
    return bool(answer.logits[rows[0], cols[0]] > 0)


def local_answer(model, embedding, click: np.ndarray, inner) -> BoxAnswer:
    """The answer to the smallest candidate box centred on a click: the structure right under it."""
    half = HALF_SIDES_PX[0]
    return decoded_answer(model, embedding, clip_box(np.concatenate([click - half, click + half]), inner))


def with_local_part(model, embedding, answer: BoxAnswer, click: np.ndarray, inner) -> BoxAnswer:
    """The answer's mask united with the local answer around a positive click it misses, where that one holds it
    (the box stays the answer's: later corrections edit it)."""
    local = local_answer(model, embedding, click, inner)
    if not holds(local, click):
        return answer
    return BoxAnswer(torch.maximum(answer.logits, local.logits), answer.box, answer.iou)


def without_local_part(model, embedding, answer: BoxAnswer, click: np.ndarray, positives, inner) -> BoxAnswer:
    """The answer's mask less the local answer around a negative click inside it, where that one holds the click
    and no positive click; else the answer as it was."""
    local = local_answer(model, embedding, click, inner)
    if not holds(local, click) or any(holds(local, p) for p in positives):
        return answer
    return BoxAnswer(torch.minimum(answer.logits, -local.logits), answer.box, answer.iou)

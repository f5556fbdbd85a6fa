"""Interactive refinement: viewer prompts (3D Slicer deepgrow/deepedit, OHIF) -> one label, propagated in z."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from samora.data import Letterbox
from samora.serving.click_boxes import answers_clicks_through_boxes, click_answer
from samora.serving.decode_cache import SliceMask
from samora.serving.mask_scores import mask_stability

# A 2D box propagates unbounded, so this threshold decides where it stops. LiteMedSAM zero-shot, 2D truth box on the
# seed slice of 4 CT organs of ../shared/data (bench/zeroshot.py --quick --sweep), whole-organ Dice at 0 / 0.5 / 0.6
# / 0.75: liver 0.754 / 0.760 / 0.760 / 0.885 (below 0.75 it runs on past the liver, to the volume's end),
# right kidney 0.898 / 0.898 / 0.899 / 0.921, left kidney 0.739 / 0.947 / 0.947 / 0.954, spleen 0.951 / 0.964 /
# 0.964 / 0.965. (An earlier random-initialised demo model had its optimum there too: 0.62 at 0.75, 0.33 at 0.85.)
MIN_PROPAGATION_STABILITY = 0.75
# Inside a 3D ROI the user has bounded the organ's z-range, so a hesitant mask there is more likely the organ's thin
# end than a neighbour. LiteMedSAM zero-shot, 3D truth ROIs of 4 CT organs of ../shared/data (bench/zeroshot.py
# --quick --sweep), whole-organ Dice at 0.75 / 0.7 / 0.6: right kidney 0.659 (stopped 17 slices short at stability
# 0.74) / 0.920 / 0.919; liver 0.887 / 0.887 / 0.866; left kidney 0.956 and spleen 0.823 at all three (seeded on the
# ROI's middle slice; with the seed chosen by roi_seed_slice the spleen reaches 0.969, the others unchanged).
ROI_MIN_PROPAGATION_STABILITY = 0.7
PROPAGATION_MARGIN_PX = 3.0  # model pixels added around the previous slice's mask box (organs grow between slices)
# where the model is unsure of the mask from the usual margin, these margins are tried too and its most confident
# mask kept: a tapering organ needs a tight box (the model fills a loose one), a growing one a looser box
# (docs/benchmarks.md section 7.4); sure slices cost one decoder pass, unsure ones three
ALTERNATIVE_MARGINS_PX = (4.0, 1.0)
RETRY_BELOW_CONFIDENCE = 0.8
# A click without a box is answered on its own slice, and spread to the neighbours only where the model is this sure
# of that slice's mask (conf click_spread_confidence): propagation from a hesitant mask carries the doubt into the
# neighbours. One click in the middle of each of 8 large organs on its largest slice, LiteMedSAM answering through
# boxes (docs/benchmarks.md section 4.12), mean 3D Dice at 0.8 / 0.7 / 0: CT 0.384 / 0.592 / 0.592, MR 0.232 / 0.411
# / 0.411 (the organs between 0.7 and 0.8 were the gallbladder, stomach, aorta, kidneys; below 0.7 only masks that
# were poor on their own slice)
PROPAGATE_CLICKS_FROM_CONFIDENCE = 0.7


class PromptError(ValueError):
    """A prompt is malformed or outside the volume; the message names what."""


@dataclass
class Prompt:
    """Clicks and an optional box, in voxel indices (i, j, k) of the image array."""

    label: str | None
    foreground: list[tuple[int, int, int]] = field(default_factory=list)
    background: list[tuple[int, int, int]] = field(default_factory=list)
    roi: tuple[int, int, int, int, int, int] | None = None  # i0, i1, j0, j1, k0, k1 (any corner order)
    slice: int | None = None


def _points(value, name: str) -> list[tuple[int, int, int]]:
    if value in (None, ""):
        return []
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"{name}: expected a list of [i, j, k] points, got {type(value).__name__}")
    out = []
    for p in value:
        if not isinstance(p, (list, tuple)) or len(p) < 3:
            raise PromptError(f"{name}: point {p!r} is not [i, j, k]")
        try:
            out.append((int(round(float(p[0]))), int(round(float(p[1]))), int(round(float(p[2])))))
        except (TypeError, ValueError) as e:
            raise PromptError(f"{name}: point {p!r} has non-numeric coordinates") from e
    return out


def parse_prompt(params: dict, label_names: list[str]) -> Prompt:
    """Accept 3D Slicer's deepgrow form, its deepedit per-label lists, and OHIF's points/point_labels."""
    label = params.get("label")
    if label is not None and not isinstance(label, str):
        raise PromptError(f"label: expected a name, got {label!r}")
    foreground = _points(params.get("foreground"), "foreground")
    background = _points(params.get("background"), "background")
    # deepedit: {"liver": [[i,j,k]], "spleen": [], "label": "liver"}; take the current label's clicks
    per_label = {k: v for k, v in params.items() if k in label_names and isinstance(v, list)}
    if per_label and not foreground:
        if label is None:
            non_empty = [k for k, v in per_label.items() if v]
            label = non_empty[0] if len(non_empty) == 1 else label
        if label in per_label:
            foreground = _points(per_label[label], label)
        background += [p for k, v in per_label.items() if k != label for p in _points(v, k)]
    # OHIF: points [[i,j,k],...] with point_labels [1,0,...]
    if "points" in params:
        pts = _points(params.get("points"), "points")
        flags = params.get("point_labels") or [1] * len(pts)
        if len(flags) != len(pts):
            raise PromptError(f"point_labels: {len(flags)} labels for {len(pts)} points")
        foreground += [p for p, f in zip(pts, flags, strict=True) if int(f) == 1]
        background += [p for p, f in zip(pts, flags, strict=True) if int(f) != 1]
    roi = params.get("roi")
    if roi not in (None, [], ""):
        if not isinstance(roi, (list, tuple)) or len(roi) != 6:
            raise PromptError(f"roi: expected [i0, i1, j0, j1, k0, k1], got {roi!r}")
        try:
            roi = tuple(int(round(float(v))) for v in roi)
        except (TypeError, ValueError) as e:
            raise PromptError(f"roi: {roi!r} has non-numeric values") from e
    else:
        roi = None
    if label is not None and label not in label_names:
        raise PromptError(f"label: unknown label {label!r}; known labels are {label_names}")
    if not foreground and roi is None:
        raise PromptError("prompt needs at least one foreground point or an roi box")
    slice_index = params.get("slice")
    return Prompt(label, foreground, background, roi, int(slice_index) if slice_index not in (None, "") else None)


def check_inside(prompt: Prompt, shape: tuple[int, int, int]) -> None:
    """Raise PromptError if any click or box corner lies outside the volume."""
    for name, pts in (("foreground", prompt.foreground), ("background", prompt.background)):
        for p in pts:
            if not all(0 <= c < s for c, s in zip(p, shape, strict=True)):
                raise PromptError(f"{name} point {list(p)} is outside the volume of shape {list(shape)}")
    if prompt.roi is not None:
        for axis in range(3):
            lo, hi = sorted(prompt.roi[2 * axis : 2 * axis + 2])
            if hi < 0 or lo >= shape[axis]:
                raise PromptError(f"roi {list(prompt.roi)} lies outside the volume of shape {list(shape)}")


@dataclass
class SlicePrompt:
    """Prompt for one slice in model pixels: points (N,2) x,y with labels, and/or a box x0,y0,x1,y1."""

    coords: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None


def _in_plane(axis: int) -> tuple[int, int]:
    rows, cols = [a for a in range(3) if a != axis]
    return rows, cols


def slice_letterbox(shape: tuple[int, int, int], axis: int, size: int, affine: np.ndarray | None = None) -> Letterbox:
    """The letterbox of the volume's slices along `axis` onto the model's size x size input (oriented by the
    voxel-to-RAS `affine`, identity when not given) - the same one its embeddings were computed with."""
    return Letterbox.for_volume(affine, shape, axis, size)


def slice_prompts(
    prompt: Prompt, axis: int, shape: tuple[int, int, int], size: int, affine: np.ndarray | None = None
) -> dict[int, SlicePrompt]:
    """Group clicks by slice along `axis` and map voxels to model pixels through the slice letterbox."""
    letterbox = slice_letterbox(shape, axis, size, affine)
    rows, cols = _in_plane(axis)
    by_slice: dict[int, list[tuple[int, int, int]]] = {}
    for flag, pts in ((1, prompt.foreground), (0, prompt.background)):
        for p in pts:
            by_slice.setdefault(p[axis], []).append((p[rows], p[cols], flag))
    box = None
    if prompt.roi is not None:
        r0, r1, c0, c1 = _roi_in_plane(prompt.roi, axis, letterbox)
        box = letterbox.box(r0, r1, c0, c1)
        k0, k1 = sorted(prompt.roi[2 * axis : 2 * axis + 2])
        if not by_slice:
            centre = prompt.slice if prompt.slice is not None else (k0 + k1) // 2
            by_slice[min(max(centre, 0), shape[axis] - 1)] = []
    out = {}
    for k, pts in by_slice.items():
        coords = letterbox.points(np.array([[r, c] for r, c, _ in pts], dtype=np.float32))
        labels = np.array([f for _, _, f in pts], dtype=np.float32)
        out[int(k)] = SlicePrompt(coords, labels, box)
    return out


def _roi_in_plane(roi: tuple[int, ...], axis: int, letterbox: Letterbox) -> tuple[int, int, int, int]:
    """The ROI's inclusive (row0, row1, col0, col1) on the slice, clipped to it."""
    rows, cols = _in_plane(axis)
    r0, r1 = sorted(roi[2 * rows : 2 * rows + 2])
    c0, c1 = sorted(roi[2 * cols : 2 * cols + 2])
    return max(r0, 0), min(r1, letterbox.height - 1), max(c0, 0), min(c1, letterbox.width - 1)


def mask_to_prompt(
    mask: np.ndarray, letterbox: Letterbox, margin_px: float = PROPAGATION_MARGIN_PX, within: np.ndarray | None = None
) -> SlicePrompt | None:
    """The next slice's prompt from a mask on the slice grid: its bounding box plus a margin in model pixels,
    clipped to the slice (and to `within`, a model-pixel box such as a 3D ROI's)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    box = letterbox.box(int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))
    box += np.array([-margin_px, -margin_px, margin_px, margin_px], dtype=np.float32)
    h, w = letterbox.inner
    limits = np.array([0, 0, w, h], dtype=np.float32) if within is None else within
    box = np.concatenate([np.maximum(box[:2], limits[:2]), np.minimum(box[2:], limits[2:])])
    return SlicePrompt(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), box)


def decode_slice_prompt(model, embedding: torch.Tensor, prompt: SlicePrompt, letterbox: Letterbox) -> np.ndarray:
    """Mask logits (H, W) on the slice grid for one slice prompt on a cached embedding (mask = logits > 0)."""
    return _decode(model, embedding, prompt, letterbox)[0]


@torch.no_grad()
def _decode(
    model, embedding: torch.Tensor, prompt: SlicePrompt, letterbox: Letterbox, memo=None
) -> tuple[np.ndarray, float]:
    """decode_slice_prompt's logits, and the prompt head's predicted IoU of that mask. Clicks on a prompt path that
    learned from boxes are answered through boxes (samora.serving.click_boxes)."""
    if answers_clicks_through_boxes(model, prompt.coords):
        answer = click_answer(model, embedding, prompt.coords, prompt.labels, prompt.box, letterbox.inner, memo)
        if answer is not None:
            return letterbox.back(answer.logits[None, None])[0, 0].cpu().numpy(), answer.iou
    device = embedding.device
    kwargs = {}
    if len(prompt.coords):
        kwargs["points"] = (
            torch.as_tensor(prompt.coords, device=device)[None],
            torch.as_tensor(prompt.labels, device=device)[None],
        )
    if prompt.box is not None:
        kwargs["boxes"] = torch.as_tensor(prompt.box, device=device)[None]
    out = model.prompt(embedding, **kwargs)
    multimask = prompt.box is None and len(prompt.coords) == 1 and model.backbone.pretrained
    logits = model.prompt_head.best_mask(out, multimask=multimask)
    iou = out["iou"][0, 1:].max() if multimask else out["iou"][0, 0]  # the chosen token's
    return letterbox.back(logits)[0, 0].float().cpu().numpy(), float(iou)


def decode_mask(model, embedding: torch.Tensor, prompt: SlicePrompt, letterbox: Letterbox, memo=None) -> SliceMask:
    """decode_slice_prompt's mask, its stability, and how sure the model is of it: predicted IoU x stability.
    `memo` keeps a click prompt's answers after each click between requests (click_boxes.click_answer)."""
    logits, iou = _decode(model, embedding, prompt, letterbox, memo)
    stability = mask_stability(logits)
    return SliceMask(logits > 0, stability, iou * stability)


def prompt_key(prompt: SlicePrompt) -> bytes:
    """The bytes that identify a slice prompt (its clicks, their labels, its box) in the decode cache."""
    box = b"" if prompt.box is None else np.asarray(prompt.box, np.float32).tobytes()
    clicks = np.asarray(prompt.coords, np.float32).tobytes() + np.asarray(prompt.labels, np.float32).tobytes()
    return clicks + b"|" + box


@dataclass
class SliceDecoder:
    """One request's prompt decoder over one volume's slices: embeddings come from the runtime's shared cache, and
    each (slice, prompt) is decoded once per model (runtime.cached_decode), so a prompt repeated with a changed click
    re-decodes only the slices whose propagated box changed."""

    runtime: object
    path: str
    model: object
    letterbox: Letterbox

    def __call__(self, k: int, prompt: SlicePrompt) -> SliceMask:
        def decode() -> SliceMask:
            embedding = self.runtime.slice_embedding(self.path, k)
            return decode_mask(self.model, embedding, prompt, self.letterbox, self.click_memo(k))

        return self.runtime.cached_decode(self.path, k, self.model, prompt_key(prompt), decode)

    def click_memo(self, k: int):
        """Keeps slice k's answers after each click in the runtime, so that a correction click costs only its edit."""
        return functools.partial(self.runtime.cached_click_answer, self.path, k, self.model)


def propagated_mask(decoder: SliceDecoder, z: int, previous: np.ndarray, within: np.ndarray | None) -> SliceMask:
    """Slice z's mask from the previous mask's box plus PROPAGATION_MARGIN_PX, or, where the model is unsure of that
    mask, from whichever of the ALTERNATIVE_MARGINS_PX it is most confident of."""

    def attempt(margin: float) -> SliceMask:
        return decoder(z, mask_to_prompt(previous, decoder.letterbox, margin, within))

    best = attempt(PROPAGATION_MARGIN_PX)
    if best.confidence < RETRY_BELOW_CONFIDENCE:
        best = max([best, *map(attempt, ALTERNATIVE_MARGINS_PX)], key=lambda tried: tried.confidence)
    return best


def roi_seed_slice(decoder: SliceDecoder, box_prompt: SlicePrompt, z_lo: int, z_hi: int) -> int:
    """The slice of a 3D ROI's middle half where its box gives the model's most confident mask (predicted IoU x
    stability). The ROI's box is the union of the organ's cross-sections, so on most slices it is loose and the mask
    takes in neighbours that propagation then carries on; where the organ fills the box the model says so."""
    quarter = (z_hi - z_lo) // 4
    candidates = range(z_lo + quarter, z_hi - quarter + 1)
    return max(candidates, key=lambda k: decoder(k, box_prompt).confidence)


def propagation_threshold(min_stability: float, within_roi: bool) -> float:
    """The stability below which propagation stops: the configured one, capped lower inside a 3D ROI."""
    return min(min_stability, ROI_MIN_PROPAGATION_STABILITY) if within_roi else min_stability


def refine(
    runtime,
    path: str,
    prompt: Prompt,
    max_propagation: int = 512,
    min_pixels: int = 4,
    min_stability: float = MIN_PROPAGATION_STABILITY,
    click_confidence: float = PROPAGATE_CLICKS_FROM_CONFIDENCE,
) -> tuple[np.ndarray, dict]:
    """Segment the prompted slices, then propagate slice by slice in both directions (each next slice prompted
    with the previous mask's box plus a margin) until the structure vanishes, jumps away from the previous slice,
    or the model's mask turns unstable. A 3D ROI also bounds the propagation in z and in-plane (and lowers the
    stability threshold to ROI_MIN_PROPAGATION_STABILITY there)."""
    version, model = runtime.model()
    volume, _ = runtime.volume(path)
    check_inside(prompt, volume.shape)
    axis = volume.axial_axis
    letterbox = slice_letterbox(volume.shape, axis, model.config.image_size, volume.affine)
    out = np.zeros(volume.shape, dtype=np.uint8, order="F")  # NIfTI's layout: written without a transpose
    seeds = slice_prompts(prompt, axis, volume.shape, model.config.image_size, volume.affine)
    z_lo, z_hi, within = propagation_limits(prompt, axis, volume.shape[axis], letterbox)
    threshold = propagation_threshold(min_stability, within is not None)
    decoder = SliceDecoder(runtime, path, model, letterbox)
    done: set[int] = set()

    def put(k: int, mask: np.ndarray) -> None:
        selector = [slice(None)] * 3
        selector[axis] = k
        out[tuple(selector)] = np.maximum(out[tuple(selector)], mask.astype(np.uint8))

    if within is not None and not prompt.foreground and not prompt.background and prompt.slice is None:
        (box_prompt,) = seeds.values()
        seeds = {roi_seed_slice(decoder, box_prompt, z_lo, z_hi): box_prompt}
    seed_masks, sure = decode_seeds(decoder, seeds, click_confidence)
    for k, mask in seed_masks.items():
        put(k, mask)
        done.add(k)
    for k in sure:
        for step in (1, -1):
            previous = seed_masks[k]
            z = k + step
            for _ in range(max_propagation):
                if z < z_lo or z > z_hi or z in done or previous.sum() < min_pixels:
                    break
                decoded = propagated_mask(decoder, z, previous, within)
                mask = decoded.mask
                # stop when the structure vanishes or jumps (little overlap with the previous slice), or when the
                # mask is unstable: past an organ's end a box prompt still yields a mask, but a hesitant one
                overlap = np.logical_and(mask, previous).sum() / max(previous.sum(), 1)
                if mask.sum() < min_pixels or overlap < 0.2 or decoded.stability < threshold:
                    break
                put(z, mask)
                done.add(z)
                previous = mask
                z += step
    unsure = sorted(set(seed_masks) - set(sure))
    return out, {"model_version": version, "slices": sorted(done), "label": prompt.label, "not_propagated": unsure}


def decode_seeds(
    decoder: SliceDecoder, seeds: dict[int, SlicePrompt], click_confidence: float = PROPAGATE_CLICKS_FROM_CONFIDENCE
) -> tuple[dict[int, np.ndarray], list[int]]:
    """Each prompted slice's mask, and the slices to propagate from: those with a box, and click-only ones whose
    mask the model is sure of (confidence >= click_confidence)."""
    masks, sure = {}, []
    for k, sp in sorted(seeds.items()):
        decoded = decoder(k, sp)
        masks[k] = decoded.mask
        if sp.box is not None or decoded.confidence >= click_confidence:
            sure.append(k)
    return masks, sure


def propagation_limits(
    prompt: Prompt, axis: int, depth: int, letterbox: Letterbox
) -> tuple[int, int, np.ndarray | None]:
    """z range a prompt may propagate over, and the in-plane model box it stays inside (a 3D ROI's)."""
    if prompt.roi is None:
        return 0, depth - 1, None
    z_lo, z_hi = sorted(prompt.roi[2 * axis : 2 * axis + 2])
    if z_lo == z_hi:  # a 2D box drawn on one slice: propagate beyond it, unbounded in-plane
        return 0, depth - 1, None
    r0, r1, c0, c1 = _roi_in_plane(prompt.roi, axis, letterbox)
    return max(z_lo, 0), min(z_hi, depth - 1), letterbox.box(r0, r1, c0, c1)

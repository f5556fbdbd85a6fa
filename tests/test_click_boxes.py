"""Clicks answered through boxes on a box-trained prompt path (samora.serving.click_boxes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samora.serving import click_boxes, interactive

SIZE = 256  # the model grid; the fake volume's slices are 256 x 256, so voxels and model pixels coincide (+0.5)


class _DiscModel:
    """Stands in for a box-trained model: a box's mask is the ellipse inscribed in it (crisp logits), its predicted IoU
    is iou_of(box width); clicks alone answer an empty mask, clicks with a box the whole box; both are recorded."""

    def __init__(self, iou_of, trained_on: str = "boxes", pretrained: bool = True) -> None:
        self.iou_of, self.prompt_head, self.backbone = iou_of, self, self
        self.prompt_path_trained_on, self.pretrained = trained_on, pretrained
        self.point_calls = 0
        self.boxes_decoded = 0

    def prompt(self, embedding, boxes=None, points=None) -> dict[str, torch.Tensor]:
        if points is not None:
            self.point_calls += 1
            logits = torch.full((1, 4, SIZE, SIZE), -20.0)
            if boxes is not None:
                x0, y0, x1, y1 = (int(v) for v in boxes[0].tolist())
                logits[..., y0:y1, x0:x1] = 20.0
            return {"iou": torch.full((1, 4), 0.2), "low_res_logits": logits}
        self.boxes_decoded += len(boxes)
        yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
        logits, ious = [], []
        for x0, y0, x1, y1 in boxes.tolist():
            inside = ((xx - (x0 + x1) / 2) / (x1 - x0)) ** 2 + ((yy - (y0 + y1) / 2) / (y1 - y0)) ** 2 <= 0.25
            logits.append(torch.where(inside, 20.0, -20.0))
            ious.append(self.iou_of(x1 - x0))
        low = torch.stack(logits)[:, None].expand(-1, 4, -1, -1)
        return {"iou": torch.tensor(ious)[:, None].expand(-1, 4), "low_res_logits": low}

    def best_mask(self, out: dict[str, torch.Tensor], multimask: bool = False) -> torch.Tensor:
        return out["low_res_logits"][:, :1]


def _answer(model, foreground, background=(), roi=None, memo=None) -> tuple[np.ndarray, float]:
    """The served answer (interactive._decode) to clicks (row, col) on slice 0 of a 256 x 256 x 1 volume."""
    clicks = [(r, c, 0) for r, c in foreground], [(r, c, 0) for r, c in background]
    prompt = interactive.Prompt("liver", *clicks, roi=roi)
    (seed,) = interactive.slice_prompts(prompt, 2, (SIZE, SIZE, 1), SIZE).values()
    letterbox = interactive.slice_letterbox((SIZE, SIZE, 1), 2, SIZE)
    return interactive._decode(model, torch.zeros(1, 4, 2, 2), seed, letterbox, memo)


def _peaked_at(width: float):
    return lambda w: 0.9 - abs(w - width) / 400


def test_a_click_is_answered_by_the_best_scored_box_around_it():
    model = _DiscModel(_peaked_at(48))  # the 24-pixel half-side box scores best
    logits, iou = _answer(model, [(128, 128)])
    assert model.point_calls == 0
    assert iou == pytest.approx(0.9)
    area = (logits > 0).sum()
    assert abs(area - np.pi * 24**2) < 0.05 * np.pi * 24**2  # the 48-wide disc, not the 20- or 108-wide one
    assert logits[128, 128] > 0


def test_a_negative_click_inside_the_answer_cuts_its_box_on_one_side():
    model = _DiscModel(_peaked_at(48))
    logits, _ = _answer(model, [(128, 128)], background=[(128, 145)])  # inside the 48 disc, 17 px right of centre
    assert logits[128, 145] < 0 and logits[128, 128] > 0
    # one side of the 48 box moved to 1 px short of the click (the only cut that keeps the positive): a 48 x 40 ellipse
    assert abs((logits > 0).sum() - np.pi * 24 * 20) < 0.05 * np.pi * 24 * 20


def test_a_positive_click_the_answer_misses_grows_its_box_to_hold_it():
    model = _DiscModel(_peaked_at(48))
    first, _ = _answer(model, [(128, 128)])
    assert first[128, 160] < 0  # 32 px right of the first click, outside its 48 disc
    logits, _ = _answer(model, [(128, 128), (128, 160)])
    assert logits[128, 160] > 0 and logits[128, 128] > 0
    assert model.point_calls == 0


class _NeighbourModel(_DiscModel):
    """A disc model whose boxes longer than 60 pixels find another structure: their disc is moved 100 pixels."""

    def prompt(self, embedding, boxes=None, points=None) -> dict[str, torch.Tensor]:
        out = super().prompt(embedding, boxes=boxes, points=points)
        if points is None:
            wide = ((boxes[:, 2:] - boxes[:, :2]).amax(dim=1) > 60)[:, None, None, None]
            out["low_res_logits"] = torch.where(wide, out["low_res_logits"].roll(-100, dims=-2), out["low_res_logits"])
        return out


def test_a_grown_box_that_finds_another_structure_is_not_taken_the_clicks_local_part_is_added():
    """The second click's grown box (66 pixels long) answers a disc elsewhere, which keeps none of the first answer:
    the first answer stays, with the small disc around the click added."""
    first, _ = _answer(_NeighbourModel(_peaked_at(48)), [(128, 128)])
    assert abs((first > 0).sum() - np.pi * 24**2) < 0.05 * np.pi * 24**2  # the 48 box, not the moved 108 one
    logits, _ = _answer(_NeighbourModel(_peaked_at(48)), [(128, 128), (128, 160)])
    assert logits[128, 128] > 0 and logits[128, 160] > 0 and not (logits[:60] > 0).any()
    assert (first > 0).sum() < (logits > 0).sum() < (first > 0).sum() + np.pi * click_boxes.HALF_SIDES_PX[0] ** 2
    grown, _ = _answer(_DiscModel(_peaked_at(48)), [(128, 128), (128, 160)])  # where the grown box is right
    assert (grown > 0).sum() > (logits > 0).sum() + 200


def test_corrections_edit_the_first_clicks_answer_instead_of_framing_the_clicks_anew():
    """Framed anew, a far second click would give a box around both clicks; edited, the first answer's box grows by
    GROW_PX past the click and no more."""
    model = _DiscModel(_peaked_at(48))
    logits, _ = _answer(model, [(128, 128), (128, 160)])
    cols = np.nonzero((logits > 0).any(axis=0))[0]
    assert cols.max() + 1 == pytest.approx(160.5 + click_boxes.GROW_PX, abs=1.5)  # the grown box's right side
    assert cols.min() == pytest.approx(104.5, abs=1.5)  # its left side: the first answer's


def test_a_negative_click_no_cut_can_leave_out_keeps_the_answer():
    """On the positive click itself no cut keeps the positive in the box: the first answer stands (no points)."""
    model = _DiscModel(_peaked_at(48))
    logits, _ = _answer(model, [(128, 128)], background=[(128, 128)])
    assert model.point_calls == 0
    assert abs((logits > 0).sum() - np.pi * 24**2) < 0.05 * np.pi * 24**2


def test_a_positive_click_the_grown_answer_misses_adds_its_local_part_when_the_annotator_insists():
    """Diagonal from the first disc, the click lies outside the ellipse of the grown box too: left so the first time
    (the grown box's answer stands), the small disc around it is added when the same place is clicked again."""
    model = _DiscModel(_peaked_at(48))
    once, _ = _answer(model, [(128, 128), (165, 165)])
    assert once[165, 165] < 0 and once[128, 128] > 0
    logits, _ = _answer(model, [(128, 128), (165, 165), (165, 165)])
    assert logits[165, 165] > 0 and logits[128, 128] > 0
    grown_x1 = 165.5 + click_boxes.GROW_PX
    grown_disc = np.pi * ((grown_x1 - 104.5) / 2) ** 2
    assert abs((once > 0).sum() - grown_disc) < 0.05 * grown_disc
    assert grown_disc < (logits > 0).sum() < grown_disc + np.pi * click_boxes.HALF_SIDES_PX[0] ** 2


def test_a_negative_click_no_cut_can_honour_takes_out_its_local_part_when_the_annotator_insists():
    """Between two positive clicks on one row every cut leaves a positive out of the box: the answer stands the first
    time; clicked again, the small disc around the negative click, which holds neither positive, is taken out."""
    model = _DiscModel(_peaked_at(48))
    positives = [(128, 128), (128, 150)]
    once, _ = _answer(model, positives, background=[(128, 139)])
    assert once[128, 139] > 0 and abs((once > 0).sum() - np.pi * 24**2) < 0.05 * np.pi * 24**2
    logits, _ = _answer(model, positives, background=[(128, 139), (128, 139)])
    assert logits[128, 139] < 0 and logits[128, 128] > 0 and logits[128, 150] > 0
    removed = np.pi * click_boxes.HALF_SIDES_PX[0] ** 2
    assert abs((logits > 0).sum() - (np.pi * 24**2 - removed)) < 0.05 * np.pi * 24**2


def test_several_positive_clicks_are_framed_together():
    model = _DiscModel(_peaked_at(68))
    logits, _ = _answer(model, [(128, 110), (128, 140)])
    assert logits[128, 110] > 0 and logits[128, 140] > 0


def test_a_correction_decodes_only_its_own_edit_when_the_earlier_answers_are_kept():
    model, kept = _DiscModel(_peaked_at(48)), {}

    def memo(key, compute):
        return kept[key] if key in kept else kept.setdefault(key, compute())

    clicks = [(128, 128), (128, 160), (160, 128)]  # each correction 32 px from the first click, outside its ellipse
    _answer(model, clicks[:1], memo=memo)
    assert model.boxes_decoded >= len(click_boxes.HALF_SIDES_PX) and len(kept) == 1
    for n in (2, 3):
        before = model.boxes_decoded
        logits, _ = _answer(model, clicks[:n], memo=memo)
        assert model.boxes_decoded - before == 1  # this click's grown box only
        unkept, _ = _answer(_DiscModel(_peaked_at(48)), clicks[:n])
        np.testing.assert_array_equal(logits, unkept)
    assert len(kept) == 3


def test_when_no_box_holds_the_click_the_prompt_path_answers_it():
    """A click in the slice's corner lies outside every disc inscribed in the (clipped) boxes: the points decide."""
    model = _DiscModel(_peaked_at(48))
    logits, iou = _answer(model, [(0, 0)])
    assert model.point_calls == 1
    assert (logits > 0).sum() == 0 and iou == pytest.approx(0.2)


@pytest.mark.parametrize("trained_on, pretrained", [("points and boxes", True), ("boxes", False)])
def test_clicks_go_to_the_prompt_path_unless_it_learned_from_boxes_with_real_weights(trained_on, pretrained):
    model = _DiscModel(_peaked_at(48), trained_on, pretrained)
    _answer(model, [(128, 128)])
    assert model.point_calls == 1


def test_a_box_answer_that_the_box_cut_is_refit_wider_when_the_model_is_surer():
    """The best candidate (48 wide) is cut by its box (the disc touches every side); its box pushed out by half a
    box on each cut side (96 wide) scores higher and is kept."""
    model = _DiscModel(lambda w: 0.95 if w > 90 and w < 100 else _peaked_at(48)(w))
    logits, iou = _answer(model, [(128, 128)])
    assert iou == pytest.approx(0.95)
    assert (logits > 0).sum() > np.pi * 44**2


BOX_ROI = (100, 155, 100, 155, 0, 0)  # rows, columns, slice: the disc's bounding box is x, y 100..156


@pytest.mark.parametrize("clicks", [{"foreground": [(128, 128)]}, {"background": [(101, 101)]}])
def test_clicks_the_box_answer_agrees_with_leave_it_alone(clicks):
    """Given to LiteMedSAM, clicks lower its box answers: they are never handed to it, and where the box's own mask
    already agrees with them (a positive click inside, a negative one outside) the box's answer stands."""
    model = _DiscModel(_peaked_at(48))
    logits, _ = _answer(model, roi=BOX_ROI, **{"foreground": [], **clicks})
    assert model.point_calls == 0
    assert abs((logits > 0).sum() - np.pi * 28**2) < 0.05 * np.pi * 28**2


def test_a_positive_click_inside_the_drawn_box_adds_its_local_part():
    """The box's corner lies outside its disc: the small disc around the click is added, the box is not grown."""
    model = _DiscModel(_peaked_at(48))
    logits, _ = _answer(model, foreground=[(104, 104)], roi=BOX_ROI)
    assert model.point_calls == 0
    assert logits[104, 104] > 0 and logits[128, 128] > 0
    added = (logits > 0).sum() - np.pi * 28**2
    assert 0 < added < np.pi * click_boxes.HALF_SIDES_PX[0] ** 2
    assert not (logits[:, 157 + 2 :] > 0).any()  # nothing right of the drawn box: it did not grow


def test_a_positive_click_outside_the_drawn_box_grows_it():
    model = _DiscModel(_peaked_at(48))
    logits, _ = _answer(model, foreground=[(128, 170)], roi=BOX_ROI)
    assert model.point_calls == 0
    assert logits[128, 170] > 0 and logits[128, 110] > 0


def test_a_negative_click_inside_the_drawn_box_answer_takes_its_local_part_out():
    """The drawn box is the annotator's extent and is never cut: the small disc around the click is taken out."""
    model = _DiscModel(_peaked_at(48))
    logits, _ = _answer(model, [], background=[(128, 128)], roi=BOX_ROI)
    assert model.point_calls == 0
    assert logits[128, 128] < 0 and logits[110, 110] > 0
    removed = np.pi * click_boxes.HALF_SIDES_PX[0] ** 2
    assert abs((logits > 0).sum() - (np.pi * 28**2 - removed)) < 0.05 * np.pi * 28**2


def test_a_negative_click_whose_local_part_is_most_of_a_small_answer_leaves_it():
    """On a structure smaller than the local box, the local answer is the structure itself: it stays."""
    model = _DiscModel(_peaked_at(48))
    small_box = (122, 133, 122, 133, 0, 0)  # a 12-pixel box: its disc lies inside the 20-pixel local box's disc
    logits, _ = _answer(model, [], background=[(127, 127)], roi=small_box)
    assert logits[127, 127] > 0 and abs((logits > 0).sum() - np.pi * 6**2) < 0.2 * np.pi * 6**2


def test_a_correction_of_a_drawn_box_decodes_only_its_own_edit_when_the_earlier_answers_are_kept():
    """The drawn box's answer and its answer after each click are kept apart from a click-only prompt's (same clicks,
    no box): each further click decodes its own local box only, and the result is the one computed from scratch."""
    model, kept = _DiscModel(_peaked_at(48)), {}

    def memo(key, compute):
        return kept[key] if key in kept else kept.setdefault(key, compute())

    clicks = {"foreground": [(104, 104), (151, 151)], "background": [(128, 128)]}  # two corners, then the centre
    for n_pos, n_neg in ((1, 0), (2, 0), (2, 1)):
        before = model.boxes_decoded
        given = {"foreground": clicks["foreground"][:n_pos], "background": clicks["background"][:n_neg]}
        logits, _ = _answer(model, roi=BOX_ROI, memo=memo, **given)
        # the first click: the drawn box and the click's local box; each further click: its local box only
        assert model.boxes_decoded - before == (2 if n_pos + n_neg == 1 else 1)
        unkept, _ = _answer(_DiscModel(_peaked_at(48)), roi=BOX_ROI, **given)
        np.testing.assert_array_equal(logits, unkept)
    assert logits[104, 104] > 0 and logits[151, 151] > 0 and logits[128, 128] < 0
    assert len(kept) == 4
    before = model.boxes_decoded
    _answer(model, clicks["foreground"][:1], memo=memo)  # the same click without the box: its own answer
    assert model.boxes_decoded - before >= len(click_boxes.HALF_SIDES_PX)


def test_candidate_boxes_surround_the_clicks_inside_the_slice():
    boxes = click_boxes.candidate_boxes(np.array([[10.0, 200.0], [30.0, 210.0]]), (256, 240))
    assert len(boxes) == len(click_boxes.HALF_SIDES_PX)
    assert (boxes[:, 0] <= 10).all() and (boxes[:, 2] >= 30).all() and (boxes[:, 1] <= 200).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= 240).all() and (boxes[:, 3] <= 256).all()
    widths = boxes[:, 2] - boxes[:, 0]
    assert (np.diff(widths) >= 0).all()


@pytest.mark.slow
def test_day_one_clicks_segment_the_large_organs_of_real_ct(shared_data, tmp_path):
    """Before any training, one click in the middle of each of the 8 large organs on its largest slice: mean Dice on
    that slice >= 0.7 (SAM's own answer to the click, a blob of a few dozen pixels, scored 0.00-0.05)."""
    import json
    import sys
    from pathlib import Path

    from samora.data import load_label
    from samora.serving.runtime import ModelRuntime
    from samora.serving.settings import AppSettings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from click_quality import deepest_point  # where the benchmark's annotator clicks

    torch.set_num_threads(2)
    case = shared_data / "ct_abdomen_totalseg"
    image = str(case / "image.nii.gz")
    names = {v: int(k) for k, v in json.loads((case / "labels.json").read_text())["labels"].items()}
    runtime = ModelRuntime(AppSettings(), tmp_path / "model")
    _, model = runtime.model()
    volume, _ = runtime.volume(image)
    labels = load_label(str(case / "label.nii.gz"), like=volume)[0]
    letterbox = interactive.slice_letterbox(volume.shape, 2, model.config.image_size, volume.affine)
    decoder = interactive.SliceDecoder(runtime, image, model, letterbox)
    scores = {}
    for organ in ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"):
        truth3d = labels == names[organ]
        k = int(np.argmax(truth3d.sum(axis=(0, 1))))
        truth = truth3d[:, :, k]
        i, j = deepest_point(truth)
        prompt = interactive.Prompt(organ, [(int(i), int(j), k)])
        (seed,) = interactive.slice_prompts(prompt, 2, volume.shape, model.config.image_size, volume.affine).values()
        mask = decoder(k, seed).mask
        scores[organ] = 2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())
    print({k: round(v, 3) for k, v in scores.items()})
    assert np.mean(list(scores.values())) >= 0.7, scores

"""Property-based tests (hypothesis) for prompt-coordinate handling and label validation/remapping."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samora.serving.interactive import (
    Prompt,
    PromptError,
    check_inside,
    parse_prompt,
    slice_letterbox,
    slice_prompts,
)
from samora.serving.labels import LabelMappingError, remap_by_name
from samora.serving.validation import UploadError, validate_label_upload

shapes = st.tuples(st.integers(4, 300), st.integers(4, 300), st.integers(1, 60))


@st.composite
def shape_and_point(draw):
    shape = draw(shapes)
    point = tuple(draw(st.integers(0, s - 1)) for s in shape)
    return shape, point


@given(shape_and_point(), st.sampled_from([64, 128, 256, 1024]), st.sampled_from([0, 1, 2]))
def test_click_maps_inside_model_frame_and_back(sp, size, axis):
    shape, point = sp
    prompts = slice_prompts(Prompt("liver", foreground=[point]), axis, shape, size)
    assert list(prompts) == [point[axis]]
    x, y = prompts[point[axis]].coords[0]
    assert 0 <= x <= size and 0 <= y <= size
    rows, cols = [a for a in range(3) if a != axis]
    # the letterbox keeps the aspect ratio (longest side = size), so the click lands inside the unpadded part,
    # and inverting the mapping recovers the voxel the user clicked (identity affine: rows of the model input run
    # along the array's second in-plane axis, the anterior one)
    letterbox = slice_letterbox(shape, axis, size)
    r, c = (point[cols], point[rows]) if letterbox.transpose else (point[rows], point[cols])
    h, w = letterbox.shown
    r, c = (h - 1 - r if letterbox.flip_rows else r), (w - 1 - c if letterbox.flip_cols else c)
    scale = size / max(shape[rows], shape[cols])
    assert x <= w * scale and y <= h * scale
    assert int(np.floor(x / scale)) == c
    assert int(np.floor(y / scale)) == r


@given(shape_and_point(), shape_and_point())
def test_roi_corner_order_does_not_matter(a, b):
    shape = a[0]
    p, q = a[1], tuple(min(v, s - 1) for v, s in zip(b[1], shape, strict=True))
    roi = (p[0], q[0], p[1], q[1], p[2], q[2])
    swapped = (q[0], p[0], q[1], p[1], q[2], p[2])
    one = slice_prompts(Prompt("liver", roi=roi, slice=p[2]), 2, shape, 128)
    two = slice_prompts(Prompt("liver", roi=swapped, slice=p[2]), 2, shape, 128)
    assert list(one) == list(two)
    box = next(iter(one.values())).box
    assert np.array_equal(box, next(iter(two.values())).box)
    assert box[0] <= box[2] and box[1] <= box[3] and box.min() >= 0 and box.max() <= 128


@given(shapes, st.lists(st.integers(-50, 400), min_size=3, max_size=3))
def test_points_outside_are_refused_with_their_coordinates(shape, point):
    inside = all(0 <= c < s for c, s in zip(point, shape, strict=True))
    prompt = parse_prompt({"label": "liver", "foreground": [point]}, ["liver"])
    if inside:
        check_inside(prompt, shape)
    else:
        with pytest.raises(PromptError, match="outside the volume"):
            check_inside(prompt, shape)


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=3))
def test_parse_prompt_never_crashes_on_junk(params):
    try:
        parse_prompt(params, ["liver"])
    except PromptError:
        pass


@given(st.permutations(["liver", "spleen", "kidney"]), st.integers(0, 2**31 - 1))
def test_remap_is_independent_of_viewer_order(order, seed):
    model = {"liver": 1, "spleen": 2, "kidney": 3}
    truth = np.random.default_rng(seed).integers(0, 4, (6, 5, 4))
    viewer = np.zeros_like(truth)
    info = []
    for viewer_idx, name in enumerate(order, start=1):
        viewer[truth == model[name]] = viewer_idx
        info.append({"name": name, "idx": viewer_idx})
    assert np.array_equal(remap_by_name(viewer, info, model), truth)


@given(st.lists(st.integers(0, 9), min_size=8, max_size=8))
def test_remap_without_info_accepts_only_configured_values(values):
    model = {"a": 1, "b": 2, "c": 5}
    arr = np.array(values).reshape(2, 4)
    if set(values) <= {0, 1, 2, 5}:
        assert np.array_equal(remap_by_name(arr, None, model), arr)
    else:
        with pytest.raises(LabelMappingError):
            remap_by_name(arr, None, model)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 4), min_size=1, max_size=4), st.booleans())
def test_label_upload_validation(tmp_path, extra_values, shift_affine):
    image = np.random.default_rng(0).normal(0, 100, (8, 8, 4)).astype(np.int16)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    label = np.zeros(image.shape, np.int16)
    label.flat[: len(extra_values)] = extra_values
    label_affine = affine.copy()
    if shift_affine:
        label_affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(label, label_affine), str(tmp_path / "lab.nii.gz"))
    labels = {"liver": 1, "spleen": 2, "kidney": 3}
    ok = not shift_affine and set(extra_values) <= {0, 1, 2, 3}
    if ok:
        validate_label_upload(str(tmp_path / "lab.nii.gz"), str(tmp_path / "img.nii.gz"), labels, None)
    else:
        with pytest.raises((UploadError, LabelMappingError)):
            validate_label_upload(str(tmp_path / "lab.nii.gz"), str(tmp_path / "img.nii.gz"), labels, None)

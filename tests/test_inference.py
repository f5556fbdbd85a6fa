"""Whole-volume inference on a real CT: output on the input's exact grid, memory bounded by the batch."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

import samora.engine.inference as inference
from samora.config import ModelConfig
from samora.data import load_volume
from samora.engine.inference import segment_volume
from samora.model import SamoraModel


@pytest.fixture(scope="module")
def model():
    return SamoraModel(ModelConfig(preset="tiny", image_size=128, labels={"liver": 1, "spleen": 2})).eval()


def test_real_ct_segmentation_on_input_grid(model, shared_data, monkeypatch):
    volume = load_volume(shared_data / "ct_abdomen_totalseg" / "image.nii.gz")
    batches = []
    real = inference.predict_slices

    def spy(m, stack, device="cpu", letterbox=None):
        batches.append(stack.shape[0])
        return real(m, stack, device, letterbox)

    monkeypatch.setattr(inference, "predict_slices", spy)
    tracemalloc.start()
    result = segment_volume(model, volume, batch_size=8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.labels.shape == volume.shape == (122, 101, 112)
    assert result.labels.dtype == np.int16
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    assert max(batches) <= 8 and sum(batches) == volume.shape[volume.axial_axis]
    # numpy-side peak: labels + the normalised copy + one batch, not K probability volumes
    voxels = int(np.prod(volume.shape))
    assert peak < voxels * (2 + 4) + 64 * 2**20, peak
    assert np.isfinite(result.mean_entropy) and result.mean_entropy >= 0


def test_probabilities_sum_to_one_and_match_labels(model, shared_data):
    volume = load_volume(shared_data / "ct_abdomen_totalseg" / "image.nii.gz")
    volume.array = volume.array[:, :, 40:48].copy()  # a thin slab keeps this fast
    result = segment_volume(model, volume, batch_size=4, return_probabilities=True)
    probs = result.probabilities.astype(np.float32)
    assert probs.shape == (3, *volume.shape)
    assert np.allclose(probs.sum(0), 1.0, atol=2e-2)
    top2 = np.sort(probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 2e-3  # float16 storage can only flip near-ties
    assert clear.mean() > 0.5
    assert np.array_equal(probs.argmax(0)[clear], result.labels[clear])


def test_output_written_with_input_affine(model, shared_data, tmp_path):
    from samora.data import load_label, save_label

    volume = load_volume(shared_data / "mr_brain_pyradiomics" / "image.nrrd")
    result = segment_volume(model, volume, batch_size=8)
    save_label(result.labels, volume.affine, tmp_path / "out.nii.gz")
    labels, affine = load_label(tmp_path / "out.nii.gz", like=volume)
    assert labels.shape == volume.shape
    assert np.allclose(affine, volume.affine, atol=1e-4)


def test_mismatched_input_size_is_resized(model):
    stack = torch.rand(2, 3, 77, 91)
    probs = inference.predict_slices(model, stack)
    assert probs.shape == (2, 3, 77, 91)

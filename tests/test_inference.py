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

    def spy(m, stack, device="cpu", letterbox=None, embeddings=None, encode_batch_size=None):
        batches.append(stack.shape[0])
        return real(m, stack, device, letterbox, embeddings, encode_batch_size)

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
    # the scoring statistic: mean over body voxels of the per-voxel entropy of these probabilities
    body = inference.normalised_volume(volume) > inference.BODY_THRESHOLD
    entropy = -(probs * np.log(np.clip(probs, 1e-8, None))).sum(0)
    assert result.mean_entropy == pytest.approx(float(entropy[body].mean()), rel=1e-2)


def test_the_encoder_and_the_head_take_their_own_batch_sizes(model, shared_data, monkeypatch):
    volume = load_volume(shared_data / "ct_abdomen_totalseg" / "image.nii.gz")
    volume.array = volume.array[:, :, 40:50].copy()
    together = segment_volume(model, volume, batch_size=4)
    encoded, decoded = [], []
    real_encode, real_decode = model.encode, model.decode
    monkeypatch.setattr(model, "encode", lambda x: encoded.append(len(x)) or real_encode(x))
    monkeypatch.setattr(model, "decode", lambda e: decoded.append(len(e)) or real_decode(e))
    apart = segment_volume(model, volume, batch_size=4, encode_batch_size=1)
    assert encoded == [1] * 10 and decoded == [4, 4, 2]
    # the same slices through the same model: only a near-tie voxel may flip with the encoder's batch size
    assert (apart.labels != together.labels).mean() < 1e-4


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


def _counting_encoder(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x: calls.append(len(x)) or encode(x))
    return calls


def test_embedding_store_makes_a_repeated_segmentation_decode_only(model, monkeypatch, tmp_path):
    """Scoring, auto-segmentation and training share one folder of slice embeddings: a study segmented before
    costs no encoder call, and the result matches the uncached one (float16 embeddings)."""
    from samora.data import Volume
    from samora.engine.embeddings import EmbeddingStore

    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(40, 200, (40, 36, 6)).astype(np.float32), np.eye(4), "synthetic", "CT")
    calls = _counting_encoder(model, monkeypatch)
    plain = segment_volume(model, volume, batch_size=2, return_probabilities=True)
    assert sum(calls) == 6
    store = EmbeddingStore(tmp_path, model)
    first = segment_volume(model, volume, batch_size=2, return_probabilities=True, embeddings=store)
    assert sum(calls) == 12 and len(list(store.directory.glob("*.npy"))) == 6
    again = segment_volume(
        model, volume, batch_size=4, return_probabilities=True, embeddings=EmbeddingStore(tmp_path, model)
    )
    assert sum(calls) == 12, "a slice encoded before was encoded again"
    np.testing.assert_array_equal(first.labels, again.labels)
    assert np.abs(first.probabilities.astype(np.float32) - plain.probabilities.astype(np.float32)).max() < 0.02


def test_embedding_store_keeps_under_its_byte_budget_oldest_first(model, tmp_path):
    from samora.engine.embeddings import EmbeddingStore

    images = np.random.default_rng(1).random((3, 3, 128, 128)).astype(np.float16)
    one_slice = EmbeddingStore(tmp_path, model).embed(model, images[:1])[0].nbytes + 128  # + the .npy header
    store = EmbeddingStore(tmp_path, model, max_bytes=2 * one_slice)
    store.embed(model, images[:2])
    oldest = sorted(store.directory.glob("*.npy"), key=lambda p: p.stat().st_mtime)[0]
    store.embed(model, images[2:])
    kept = list(store.directory.glob("*.npy"))
    assert len(kept) == 2 and oldest not in kept
    assert sum(p.stat().st_size for p in kept) <= 2 * one_slice

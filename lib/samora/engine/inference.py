"""Whole-volume inference: slice batches through the model, back onto the input's exact voxel grid."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from samora.data import IntensityWindow, Letterbox, Volume, iter_slice_batches, normalise
from samora.engine.embeddings import EmbeddingStore
from samora.engine.segmenter import Segmenter

# slices decoded together, while LiteMedSAM's memory-bound encoder runs its own batch (conf infer_batch_size).
# Auto-segmentation of a 512x512x112 CT with every embedding ready, 2-core CPU: 9.5 s at batch 1 before the
# classes-innermost layout, 8.7-9.2 s at 1, 6.6-7.2 s at 4, 8.7-14.4 s at 8 (full-size probability tensors of
# 150 MB, re-allocated per batch)
DECODE_BATCH = 4
BODY_THRESHOLD = 0.02  # normalised intensity above which a voxel counts as body (for uncertainty)


@dataclass
class VolumeSegmentation:
    """Labels on the input grid, optional per-class probabilities, a body-averaged entropy and timings."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    mean_entropy: float = float("nan")
    timings: dict[str, float] = field(default_factory=dict)


def normalised_volume(volume: Volume, window: IntensityWindow | None = None) -> np.ndarray:
    """Volume scaled to [0, 1] with the given window or the modality's default."""
    return normalise(volume.array, window or IntensityWindow.default_for(volume.modality))


@torch.no_grad()
def predict_slices(
    model: Segmenter,
    stack: np.ndarray | torch.Tensor,
    device: str | torch.device = "cpu",
    letterbox: Letterbox | None = None,
    embeddings: EmbeddingStore | None = None,
    encode_batch_size: int | None = None,
):
    """(b, 3, H, W) slices in [0, 1] -> (b, K, H, W) class probabilities at the slices' own size.

    The slices are encoded `encode_batch_size` at a time (default: all b) and decoded together. With an embedding
    store, slices encoded before (by training, scoring or an earlier request) are not re-encoded."""
    x = torch.as_tensor(stack, dtype=torch.float32, device=device)
    letterbox = letterbox or Letterbox.for_volume(None, (*x.shape[-2:], 1), 2, model.config.image_size)
    images = letterbox.image(x)
    encode_batch = encode_batch_size or len(images)
    if embeddings is None:
        embedding = torch.cat([model.encode(chunk) for chunk in images.split(encode_batch)])
    else:
        cached = embeddings.embed(model, images.cpu().numpy(), batch_size=encode_batch, device=device)
        embedding = torch.as_tensor(cached, dtype=torch.float32, device=device)
    # classes innermost in memory: the full-size maps' argmax and entropy over classes then read contiguous runs
    # (an argmax over a (B, K, H, W) tensor's dim 1 was ~10x slower; same values either way)
    probs = model.probabilities(model.decode(embedding)).contiguous(memory_format=torch.channels_last)
    return letterbox.back(probs).clamp_(0, 1)


@torch.no_grad()
def segment_volume(
    model: Segmenter,
    volume: Volume,
    window: IntensityWindow | None = None,
    batch_size: int = DECODE_BATCH,
    return_probabilities: bool = False,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
    embeddings: EmbeddingStore | None = None,
    encode_batch_size: int | None = None,
) -> VolumeSegmentation:
    """Segment every axial slice, `batch_size` slices decoded at a time (each batch encoded `encode_batch_size` at a
    time, default all); memory grows with the batch, not the volume (except optional probabilities)."""
    start = time.perf_counter()
    model.eval()
    axis = volume.axial_axis
    scaled = normalised_volume(volume, window)
    labels = np.zeros(volume.shape, dtype=np.int16, order="F")  # NIfTI's layout: written without a transpose
    k = model.config.num_classes
    probabilities = np.zeros((k, *volume.shape), dtype=np.float16) if return_probabilities else None
    entropy_sum, body_voxels = 0.0, 0
    depth = volume.shape[axis]
    letterbox = Letterbox.for_volume(volume.affine, volume.shape, axis, model.config.image_size)
    done = 0
    for indices, stack in iter_slice_batches(scaled, axis, batch_size, model.config.context):
        probs = predict_slices(model, stack, device, letterbox, embeddings, encode_batch_size).cpu()
        body = torch.as_tensor(stack[:, 1] > BODY_THRESHOLD)
        entropy = torch.special.entr(probs).sum(1)  # -p ln p per class, 0 where p = 0; one pass, no temporaries
        entropy_sum += float(entropy[body].sum())
        body_voxels += int(body.sum())
        batch_labels = probs.argmax(1).numpy().astype(np.int16)
        for j, index in enumerate(indices):
            _put_slice(labels, axis, index, batch_labels[j])
            if probabilities is not None:
                for c in range(k):
                    _put_slice(probabilities[c], axis, index, probs[j, c].numpy().astype(np.float16))
        done += len(indices)
        if on_batch is not None:
            on_batch(done, depth)
    return VolumeSegmentation(
        labels=labels,
        probabilities=probabilities,
        mean_entropy=entropy_sum / max(body_voxels, 1),
        timings={"segment_s": time.perf_counter() - start, "slices": depth},
    )


def _put_slice(volume: np.ndarray, axis: int, index: int, plane: np.ndarray) -> None:
    selector = [slice(None)] * 3
    selector[axis] = index
    volume[tuple(selector)] = plane

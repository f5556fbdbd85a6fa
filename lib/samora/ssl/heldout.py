"""Held-out evaluation of a stage-1 objective: its loss on slices of studies that took no part in SSL training.

A falling training loss can be memorised slices (docs/benchmarks.md, MIM section); the stage-1 criterion is the
loss on an unseen study, at step 0 and at the end. The evaluation is deterministic: every slice (or an evenly
spaced subset) in fixed batches, augmentation and corruption seeded per slice, masks seeded per batch, the
objective's head in eval mode, no gradients, global RNG state untouched. At step 0 the patch level's decoder
output layer is zero, so its held-out loss is exactly the loss of predicting 0 on the masked patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from samora.ssl.augment import prepare_batch
from samora.ssl.objectives import SSLObjective

__all__ = ["HELDOUT_SEED", "evaluation_batches", "heldout_loss", "heldout_record"]

HELDOUT_SEED = 1234  # one fixed seed for views, noise and masks: step 0 and end see the same inputs


def evaluation_batches(n_slices: int, batch_size: int, max_slices: int | None = None) -> list[list[int]]:
    """Every slice (or `max_slices` evenly spaced ones) in near-equal batches, batch k taking every n-th slice.

    Near-equal rather than "full batches plus a remainder": NT-Xent on a batch of one is trivially 0, and the
    contrastive loss depends on the batch size. Interleaved rather than consecutive: a batch spans its study, as a
    shuffled training batch does, instead of holding near-identical neighbouring slices as each other's negatives.
    """
    if n_slices < 1:
        raise ValueError("no held-out slices to evaluate on")
    indices = np.arange(n_slices)
    if max_slices is not None and max_slices < n_slices:
        indices = np.unique(np.linspace(0, n_slices - 1, max(1, max_slices)).round().astype(int))
    n_batches = max(1, len(indices) // max(1, batch_size))
    return [indices[k::n_batches].tolist() for k in range(n_batches)]


def heldout_loss(
    model: nn.Module,
    objective: SSLObjective,
    cache: Any,
    batch_size: int = 16,
    seed: int = HELDOUT_SEED,
    max_slices: int | None = None,
) -> float:
    """Slice-weighted mean of `objective`'s loss over `cache` (a SliceCache of held-out studies).

    The model must already be in the objective's stage (`ssl-<level>`); model and head are left in the training
    mode they had.
    """
    from samora.data import SliceDataset

    slices = SliceDataset(cache)
    device = next(model.parameters()).device
    modes = model.training, objective.training
    model.eval()
    objective.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for number, indices in enumerate(evaluation_batches(len(slices), batch_size, max_slices)):
                keys = [(i, seed + i) for i in indices]  # a slice gets the same views/noise whatever the batching
                batch = tuple(t.to(device) for t in prepare_batch(slices, objective.preparer, keys))
                generator = torch.Generator().manual_seed(seed + 7919 * (number + 1))
                total += float(objective(model, batch, generator)["loss"]) * len(indices)
                count += len(indices)
    finally:
        model.train(modes[0])
        objective.train(modes[1])
    return total / count


def heldout_record(cache: Any, start: float | None, end: float, settings: Any) -> dict[str, Any]:
    """What the expert metadata says about the held-out evaluation (`settings`: the run's SSLSettings).

    `start` is None when a resumed run had no step-0 value for these studies."""
    n_slices = len(cache) if settings.heldout_slices is None else min(len(cache), settings.heldout_slices)
    return {
        "study_ids": list(cache.study_ids),
        "data_hash": cache.data_hash,
        "n_slices": n_slices,
        "batch_size": settings.batch_size,
        "seed": HELDOUT_SEED,
        "step0_loss": start,
        "end_loss": end,
        "end_over_step0": end / start if start else None,
    }

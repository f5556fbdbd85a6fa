"""The data side of a stage-1 step: which slices form each step's batch and the seed of each sample.

Everything random in a step is derived from (seed, level, step): the per-epoch permutation, each sample's
augmentation and the objective's masks, so a resumed run or any number of processes sees the same samples."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from samora.config import EXPERTS
from samora.distributed.context import DistContext, shard_rows
from samora.ssl.augment import prepare_batch
from samora.ssl.objectives import SSLObjective

__all__ = ["BatchMaker", "ObjectiveStep", "StepBatches", "sample_seed", "step_generator"]

# Seed-sequence "positions" reserved for the per-epoch permutation and the objective's per-step generator
# (sample positions within a batch are 0..batch_size-1, far below these).
_PERMUTATION_STREAM = 2**32 - 1
_STEP_STREAM = 2**32 - 2


def sample_seed(seed: int, level: str, step: int, position: int) -> int:
    """A well-mixed 32-bit seed for one sample of one step."""
    return int(np.random.SeedSequence([seed, EXPERTS.index(level), step, position]).generate_state(1)[0])


def step_generator(seed: int, level: str, step: int) -> torch.Generator:
    """The objective's generator (masks, noise) for one step."""
    return torch.Generator().manual_seed(sample_seed(seed, level, step, _STEP_STREAM))


class StepBatches(Sampler):
    """Yields, for steps start..total-1, this rank's part of the global batch's [(slice index, sample seed), ...];
    full batches only. Seeds follow the sample's position in the global batch, so any number of ranks sees the
    same samples with the same augmentation as one process."""

    def __init__(
        self, n_slices: int, batch_size: int, seed: int, level: str, start: int, total: int, ctx: DistContext
    ) -> None:
        self.n = n_slices
        self.batch = batch_size
        self.seed = seed
        self.level = level
        self.start = start
        self.total = total
        self.ctx = ctx
        self.per_epoch = max(1, n_slices // batch_size)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm_epoch, perm = -1, None
        for step in range(self.start, self.total):
            epoch, position = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                generator = torch.Generator().manual_seed(
                    sample_seed(self.seed, self.level, epoch, _PERMUTATION_STREAM)
                )
                perm, perm_epoch = torch.randperm(self.n, generator=generator).tolist(), epoch
            indices = perm[position * self.batch : (position + 1) * self.batch]
            keys = [(i, sample_seed(self.seed, self.level, step, j)) for j, i in enumerate(indices)]
            yield shard_rows(keys, self.ctx)


class BatchMaker(Dataset):
    """Reads a whole batch from the cache and prepares it (one call per batch keeps the per-sample ops cheap)."""

    def __init__(self, cache: Any, preparer: Callable[[torch.Tensor, int], tuple[torch.Tensor, ...]]) -> None:
        from samora.data import SliceDataset

        self.slices = SliceDataset(cache)
        self.preparer = preparer

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        return prepare_batch(self.slices, self.preparer, keys)


class ObjectiveStep(nn.Module):
    """The model and its objective as one module, so DistributedDataParallel sees every trainable parameter."""

    def __init__(self, model: nn.Module, objective: SSLObjective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Sequence[torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch, generator)

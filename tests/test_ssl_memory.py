"""SSL memory does not grow with the dataset: the slices stream from the on-disk cache (bench/ssl_memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from ssl_memory import compare  # noqa: E402


def test_ssl_peak_memory_of_50_studies_is_that_of_5(tmp_path):
    """Peak RSS of `samora pretrain` (cache build + 3 pixel steps) on 5 and on 50 studies: within 20%, and grown by
    less than half of the extra slices' bytes, which holding the slices in memory would add. ~50 s on 2 cores."""
    peaks = compare([5, 50], tmp_path, steps=3, size=96, shape=(96, 96, 40))
    cache_mb = {n: sum(p.stat().st_size for p in (tmp_path / f"out{n}" / "cache").glob("*.npy")) / 2**20 for n in peaks}
    assert cache_mb[50] > 5 * cache_mb[5]  # the 50 studies really are ~10x the data
    growth = peaks[50] - peaks[5]
    assert growth < 0.2 * peaks[5], peaks
    assert growth < 0.5 * (cache_mb[50] - cache_mb[5]), (peaks, cache_mb)

"""The server's shared in-memory embedding cache and the background pre-encoder (tiny preset, CPU)."""

from __future__ import annotations

import ctypes
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from app_helpers import app_conf

from samora.data import load_volume
from samora.engine import onnx_encoder
from samora.engine.inference import segment_volume
from samora.serving.embedding_cache import EmbeddingCache
from samora.serving.prefetch import Prefetcher, nearest_first
from samora.serving.runtime import ModelRuntime
from samora.serving.settings import AppSettings


def _volume(tmp_path, depth: int, name: str = "scan.nii.gz") -> str:
    rng = np.random.default_rng(0)
    array = (rng.random((40, 36, depth)) * 400 - 100).astype(np.int16)  # distinct slices, CT-like HU
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return str(path)


def _runtime(tmp_path, **conf) -> ModelRuntime:
    settings = AppSettings.from_conf(app_conf(tmp_path, encoder_path="fp32", **conf))
    return ModelRuntime(settings, tmp_path / "model")


def _rss_bytes() -> int:
    """Resident bytes after glibc hands freed heap back to the system: what is retained, not allocator slack."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass  # not glibc: slack stays counted
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_cache_stays_within_its_byte_budget_while_300_slices_are_encoded(tmp_path):
    runtime = _runtime(tmp_path, embedding_memory_mb=0.25)
    path = _volume(tmp_path, 300)
    # a stand-in encoder with a LiteMedSAM-like 256-channel output, so that 300 slices take seconds, not minutes
    runtime.encoder().encoder = lambda x: x.mean((1, 2, 3))[:, None, None, None] + torch.zeros(len(x), 256, 4, 4)
    for k in range(300):
        runtime.slice_embedding(path, k)
    cache, budget = runtime.embeddings, 2**18
    entry = 256 * 4 * 4 * 2  # float16
    assert cache.nbytes <= budget and len(cache) == budget // entry < 300  # the budget binds: entries were dropped
    assert cache.evicted == 300 - len(cache) and runtime.encoder_calls == 300
    assert runtime.is_cached(path, 299) and not runtime.is_cached(path, 0)  # least recently used went first
    assert cache.nbytes == len(cache) * entry  # stored in half precision
    assert runtime.slice_embedding(path, 299).dtype == torch.float32  # handed to the decoders in float32


def test_process_memory_stays_within_the_budget_with_litemedsam_sized_embeddings():
    budget = 64 * 2**20
    cache = EmbeddingCache(budget)
    before = _rss_bytes()
    for k in range(300):  # 2 MiB each in float16: 600 MiB if nothing were dropped
        cache.get_or_compute(("slice", k), lambda: torch.randn(1, 256, 64, 64))
    assert cache.nbytes <= budget and len(cache) == 32
    assert _rss_bytes() - before < budget + 96 * 2**20  # budget + transient float32 tensors and allocator slack


def test_a_slice_in_flight_is_encoded_once_however_many_threads_ask():
    cache = EmbeddingCache(2**20)
    started, release, calls = threading.Event(), threading.Event(), []

    def slow_encode():
        calls.append(1)
        started.set()
        release.wait(5)
        return torch.ones(1, 4, 2, 2)

    results = []
    first = threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow_encode)))
    first.start()
    started.wait(5)
    second = threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow_encode)))
    second.start()
    release.set()
    first.join(5)
    second.join(5)
    assert len(calls) == 1 and len(results) == 2 and all(torch.equal(r, results[0]) for r in results)


def test_nearest_first_order():
    assert nearest_first(2, 6) == [2, 1, 3, 0, 4, 5]
    assert nearest_first(99, 3) == [2, 1, 0]  # a centre outside the volume is clamped


def test_background_encoding_waits_while_a_foreground_request_runs():
    done = []
    prefetcher = Prefetcher(lambda path, k: done.append(k), lambda path, k: False)
    with prefetcher.foreground():
        prefetcher.request("study", 3, 8)
        time.sleep(0.3)
        assert done == []  # nothing in the background while a prompt is being answered
    deadline = time.time() + 5
    while len(done) < 8 and time.time() < deadline:
        time.sleep(0.01)
    assert done == nearest_first(3, 8)
    prefetcher.stop(5)


def test_a_background_slice_cancelled_for_a_request_is_encoded_first_after_it():
    """The prefetcher's encodes run cancellable while no request runs: a request arriving mid-slice stops that slice
    (as the OpenVINO path does), and the slice is the first one encoded again once the request has ended."""
    done, started, cancelled_once = [], threading.Event(), []

    def encode(path, k):
        if k == 3 and not cancelled_once:
            started.set()
            while not onnx_encoder.stop_requested():  # an inference polling its stop condition
                time.sleep(0.005)
            cancelled_once.append(k)
            raise onnx_encoder.EncodeCancelled("request arrived")
        done.append(k)

    prefetcher = Prefetcher(encode, lambda path, k: False)
    prefetcher.request("study", 3, 6)
    assert started.wait(5)
    with prefetcher.foreground():
        time.sleep(0.2)
        assert cancelled_once == [3] and done == []  # the slice gave way; nothing else started during the request
    deadline = time.time() + 5
    while len(done) < 6 and time.time() < deadline:
        time.sleep(0.01)
    assert done == nearest_first(3, 6) and prefetcher.cancelled == 1
    prefetcher.stop(5)
    assert not onnx_encoder.stop_requested()  # outside the prefetcher nothing is cancellable


def test_prefetch_warms_every_slice_so_prompts_encode_nothing(tmp_path):
    runtime = _runtime(tmp_path)
    path = _volume(tmp_path, 20)
    runtime.prefetch(path, center=5)
    deadline = time.time() + 60
    while not (runtime.prefetcher.idle() and runtime.prefetcher.encoded == 20) and time.time() < deadline:
        time.sleep(0.05)
    assert runtime.prefetcher.encoded == 20 and runtime.encoder_calls == 0
    for k in range(20):
        runtime.slice_embedding(path, k)
    assert runtime.encoder_calls == 0  # every click finds its slice warm
    runtime.prefetcher.stop(5)


@pytest.mark.parametrize("disk_gb", [0, 1])
def test_auto_segmentation_and_prompts_share_embeddings(tmp_path, disk_gb):
    runtime = _runtime(tmp_path, embedding_cache_gb=disk_gb)
    path = _volume(tmp_path, 12)
    _, model = runtime.model()
    segment_volume(model, load_volume(path), batch_size=4, embeddings=runtime.embedding_store(model))
    assert runtime.encoder_calls == 12 and len(runtime.embeddings) == 12
    for k in range(12):
        runtime.slice_embedding(path, k)
    assert runtime.encoder_calls == 12  # the prompt path found the auto-segmentation's embeddings


@pytest.mark.parametrize("budget", [1 << 20, 0])
def test_a_fresh_embedding_equals_what_later_hits_return(budget):
    """The first caller gets the same float16-rounded values as every later one (kept or not), so a prompt's mask
    does not depend on whether its slice was just encoded."""
    cache = EmbeddingCache(budget)
    value = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 3.3
    first = cache.get_or_compute("k", lambda: value)
    again = cache.get_or_compute("k", lambda: value)
    assert first.dtype == torch.float32 and not torch.equal(first, value)  # rounded: fp32 noise is not kept
    assert torch.equal(first, again)
    assert cache.encoded == (1 if budget else 2)

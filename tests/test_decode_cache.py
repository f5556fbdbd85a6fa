"""The server's decode cache: byte budget, least-recently-used eviction, and one model's masks at a time; the same
for the recent first-click answers kept for correction clicks."""

from __future__ import annotations

import numpy as np

from samora.serving.decode_cache import DecodeCache, RecentAnswers, SliceMask


def _mask(seed: int, shape=(64, 64)) -> SliceMask:
    rng = np.random.default_rng(seed)
    return SliceMask(rng.random(shape) > 0.5, 0.5 + seed / 100, 0.25 + seed / 100)


def test_a_hit_gives_back_the_decoded_mask_without_decoding():
    cache, model, calls = DecodeCache(), object(), []
    decoded = _mask(1)
    first = cache.get_or_compute(model, "k", lambda: calls.append(1) or decoded)
    again = cache.get_or_compute(model, "k", lambda: calls.append(1) or _mask(2))
    assert len(calls) == 1 and cache.decoded == 1
    for got in (first, again):
        np.testing.assert_array_equal(got.mask, decoded.mask)
        assert (got.stability, got.confidence) == (decoded.stability, decoded.confidence)


def test_the_byte_budget_drops_the_least_recently_used_mask():
    one = 64 * 64 // 8  # a 64x64 mask packs into 512 bytes
    cache, model = DecodeCache(max_bytes=2 * one), object()
    for key in ("a", "b"):
        cache.get_or_compute(model, key, lambda key=key: _mask(ord(key)))
    cache.get_or_compute(model, "a", lambda: _mask(99))  # a hit: "a" is now the most recently used
    cache.get_or_compute(model, "c", lambda: _mask(3))
    assert len(cache) == 2 and cache.nbytes == 2 * one
    calls = []
    cache.get_or_compute(model, "a", lambda: calls.append("a") or _mask(0))
    cache.get_or_compute(model, "b", lambda: calls.append("b") or _mask(0))
    assert calls == ["b"]  # "b" was dropped, "a" kept


def test_another_model_never_gets_the_last_models_masks():
    cache, old, new = DecodeCache(), object(), object()
    cache.get_or_compute(old, "k", lambda: _mask(1))
    answer = cache.get_or_compute(new, "k", lambda: _mask(2))
    np.testing.assert_array_equal(answer.mask, _mask(2).mask)
    assert cache.decoded == 2 and len(cache) == 1


def test_recent_answers_keep_the_last_ones_and_only_for_their_model():
    answers, model, calls = RecentAnswers(size=2), object(), []

    def compute(value):
        return lambda: calls.append(value) or value

    for key in ("a", "b", "a", "c"):  # "a" used again before "c" arrives: "b" is the least recently used
        answers.get_or_compute(model, key, compute(key))
    assert calls == ["a", "b", "c"] and answers.computed == 3
    assert answers.get_or_compute(model, "a", compute("a2")) == "a"
    assert answers.get_or_compute(model, "b", compute("b2")) == "b2"  # dropped, computed again
    assert answers.get_or_compute(object(), "a", compute("a3")) == "a3"  # another model computes its own

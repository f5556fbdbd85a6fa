"""The servers' shared least-recently-used rule (samora.serving.lru)."""

from __future__ import annotations

from samora.serving.lru import CostLRU, OwnedCache


def test_the_budget_drops_the_least_recently_used_and_counts_a_replaced_value_once():
    lru = CostLRU(10, len)
    lru.put("a", "xxxx")
    lru.put("b", "xxxx")
    lru.get("a")  # b is now the least recently used
    lru.put("a", "xxx")  # replaced: 3 + 4, not 4 + 4 + 3
    assert lru.total == 7 and len(lru) == 2
    lru.put("c", "xxxx")
    assert "b" not in lru and "a" in lru and "c" in lru and lru.evicted == 1 and lru.total == 7


def test_a_value_over_the_whole_budget_is_not_kept_and_drops_nothing():
    lru = CostLRU(4, len)
    lru.put("a", "xx")
    assert lru.put("big", "xxxxx") is False
    assert "big" not in lru and "a" in lru and lru.total == 2


def test_an_owned_cache_keeps_a_none_answer_and_forgets_all_for_a_new_owner():
    cache, calls = OwnedCache(8, lambda _: 1), []

    def compute():
        calls.append(1)

    first, second = object(), object()
    cache.get_or_compute(first, "k", compute)
    cache.get_or_compute(first, "k", compute)
    assert len(calls) == 1 and cache.computed == 1  # None is an answer: not computed again
    cache.get_or_compute(second, "k", compute)
    assert len(calls) == 2 and len(cache) == 1

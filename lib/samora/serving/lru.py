"""The one least-recently-used rule of the server's in-memory caches (embeddings, decoded masks, click answers)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")


class CostLRU(Generic[Value]):
    """Values under keys, the least recently used dropped first while their total cost exceeds `max_cost`; a value
    costing more than the whole budget is not kept. Not thread-safe: the caches that use it hold their own lock."""

    def __init__(self, max_cost: int, cost_of: Callable[[Value], int]) -> None:
        self.max_cost = max_cost
        self.cost_of = cost_of
        self.total = 0  # the kept values' cost
        self.evicted = 0  # values dropped for the budget
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> Value | None:
        """The value under `key` (now the most recently used), or None."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: Hashable, value: Value) -> bool:
        """Keep `value` under `key` (replacing the old one), dropping the least recently used beyond the budget;
        False where the value alone is over the budget (then it is not kept)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.total -= self.cost_of(old)
        cost = self.cost_of(value)
        if cost > self.max_cost:
            return False
        self._entries[key] = value
        self.total += cost
        while self.total > self.max_cost:
            _, dropped = self._entries.popitem(last=False)
            self.total -= self.cost_of(dropped)
            self.evicted += 1
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.total = 0


class OwnedCache(Generic[Value]):
    """A CostLRU of values computed by one owner (the served model): all dropped when another owner asks, since a new
    model version may answer differently; a value computed by an owner that was replaced meanwhile is not kept.
    Thread-safe; `computed` counts cache misses, for tests and benchmarks."""

    def __init__(self, max_cost: int, cost_of: Callable[[Value], int]) -> None:
        self.computed = 0
        self._lru: CostLRU[Value] = CostLRU(max_cost, cost_of)
        self._owner: object | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def total_cost(self) -> int:
        return self._lru.total

    def get_or_compute(self, owner: object, key: Hashable, compute: Callable[[], Value]) -> Value:
        """The value `owner` computed under `key`, or compute() and keep it."""
        with self._lock:
            if owner is not self._owner:
                self._lru.clear()
                self._owner = owner
            if key in self._lru:  # a kept None is an answer too
                return self._lru.get(key)
        value = compute()
        with self._lock:
            self.computed += 1
            if owner is self._owner:
                self._lru.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()

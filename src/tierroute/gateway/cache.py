"""The decision cache: routing decisions for repeated prompts (never answers)."""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Case and whitespace do not change a routing decision."""
    return _SPACE.sub(" ", text).strip().lower()


def cache_key(text: str, scope: str | None = None) -> str:
    """The entry of a routing text. With a `scope` (the caller's key or tenant) the entry
    is that caller's own: a hit on another key's entry would tell it that someone sent
    this very prompt a moment ago (the X-Tierroute-Cache header, and the time it took)."""
    normal = normalise(text)
    if scope is not None:
        normal = f"{scope}\x00{normal}"
    return hashlib.sha256(normal.encode()).hexdigest()


class DecisionCache(Generic[V]):
    """LRU with a time-to-live. Not thread-safe: used from the event loop only."""

    def __init__(
        self, size: int = 10_000, ttl_s: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None or self.clock() - item[0] > self.ttl_s:
            if item is not None:
                del self._items[key]
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: str, value: V) -> None:
        self._items[key] = (self.clock(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

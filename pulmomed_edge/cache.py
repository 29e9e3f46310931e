"""The response cache: LRU with a time-to-live, keyed by what fully determines a prompt."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class ResponseCache(Generic[V]):
    """At most `size` entries, each valid for `ttl_s` seconds; size 0 disables caching."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or self._clock() >= item[0]:
                if item is not None:
                    del self._items[key]
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[1]

    def __contains__(self, key: object) -> bool:
        """Whether a valid entry exists; unlike get(), counts neither a hit nor a miss (peek)."""
        return isinstance(key, str) and self.peek(key) is not None

    def peek(self, key: str) -> V | None:
        """The valid entry for key, if any; unlike get(), counts neither a hit nor a miss and
        leaves the order of eviction as it was."""
        with self._lock:
            item = self._items.get(key)
            return item[1] if item is not None and self._clock() < item[0] else None

    def put(self, key: str, value: V) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = (self._clock() + self.ttl_s, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int | float]:
        return {
            "entries": len(self._items),
            "size": self.size,
            "ttl_s": self.ttl_s,
            "hits": self.hits,
            "misses": self.misses,
        }

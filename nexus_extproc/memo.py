"""One bounded memo for the per-config caches on the hot path (routes, budget plans, packed key lists).

Their keys come from client input (model names, scope values), so each must be bounded; their values are
cheap to rebuild, so dropping everything at the bound costs one miss per key, with no LRU bookkeeping on
every hit (functools.lru_cache needs hashable arguments and its own call, and measured slower here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(dict[K, V], Generic[K, V]):
    def __init__(self, limit: int = 4096, on_clear: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.limit = limit
        self._on_clear = on_clear  # for caches derived from this one, which must go with it

    def put(self, key: K, value: V) -> V:
        if len(self) >= self.limit:
            self.clear()
            if self._on_clear is not None:
                self._on_clear()
        self[key] = value
        return value

"""LFU-DA in value buckets picks the same victims as the heap it replaced (the reference).

The bucketed version is the one that replays a million block accesses a second; this
test pins its order to the plain definition: evict the smallest ``age + hits``, ties
to the least recently released, ``age`` the value of the last block evicted.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_policies.eviction import LFUPolicy


class _HeapLFU:
    """The former implementation: one heap entry per push, stale ones skipped."""

    def __init__(self) -> None:
        self.age = 0
        self.tick = itertools.count()
        self.live: dict[Any, tuple[int, int]] = {}
        self.count: dict[Any, int] = {}
        self.heap: list[tuple[int, int, Any]] = []

    def _push(self, key: Any) -> None:
        entry = (self.age + self.count[key], next(self.tick))
        self.live[key] = entry
        heapq.heappush(self.heap, (entry[0], entry[1], key))

    def insert(self, key: Any) -> None:
        self.count[key] = 1
        self._push(key)

    def touch(self, key: Any) -> None:
        c = self.count.get(key)
        if c is None:
            return
        self.count[key] = c + 1
        if key in self.live:
            self._push(key)

    def pin(self, key: Any) -> None:
        self.live.pop(key, None)

    def unpin(self, key: Any) -> None:
        if key not in self.count:
            self.count[key] = 1
        self._push(key)

    def remove(self, key: Any) -> None:
        if self.live.pop(key, None) is not None:
            del self.count[key]

    def victim(self) -> Any:
        while self.heap:
            value, tick, key = heapq.heappop(self.heap)
            if self.live.get(key) == (value, tick):
                del self.live[key]
                del self.count[key]
                self.age = value
                return key
        return None


_OPS = st.lists(st.tuples(st.sampled_from(["insert", "touch", "pin", "unpin", "remove", "victim"]),
                          st.integers(0, 11)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_lfu_buckets_pick_the_heap_references_victims(ops: list[tuple[str, int]]) -> None:
    new, ref = LFUPolicy(8), _HeapLFU()
    evictable: set[int] = set()
    pinned: set[int] = set()
    for op, k in ops:
        # Calls as the registry makes them: insert a new block, pin an evictable one,
        # unpin a pinned one (or one committed pinned), touch a known one.
        if op == "insert" and k not in evictable and k not in pinned:
            new.insert(k)
            ref.insert(k)
            evictable.add(k)
        elif op == "touch" and (k in evictable or k in pinned):
            new.touch(k)
            ref.touch(k)
        elif op == "pin" and k in evictable:
            new.pin(k)
            ref.pin(k)
            evictable.discard(k)
            pinned.add(k)
        elif op == "unpin" and k not in evictable:
            new.unpin(k)
            ref.unpin(k)
            pinned.discard(k)
            evictable.add(k)
        elif op == "remove" and k in evictable:
            new.remove(k)
            ref.remove(k)
            evictable.discard(k)
        elif op == "victim":
            v = new.victim()
            assert v == ref.victim()
            evictable.discard(v)  # type: ignore[arg-type]
        assert len(new) == len(ref.live) == len(evictable)

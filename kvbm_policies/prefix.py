"""Prefix-aware eviction: leaves of the prefix tree go first, least recently used among them.

A block is only useful behind its whole prefix, so a radix-tree cache (SGLang's) evicts
leaves: a block whose child is still cached goes after that child. The registry does
not tell a policy a block's parent, but it calls the policy in prefix order, and that
is where the tree is read from:

- a match pins a request's blocks first to last, so a block pinned right after
  another was pinned is that block's child, and the first block a match pins is a
  root; every hit thus checks, and corrects, a block's parent;
- a save commits a request's new blocks first to last after its match, so a block
  inserted right after a pin, or right after such an insert, is the previous block's
  child. An insert that follows no pin starts no chain: between two requests with no
  hit nothing tells the last block of one from the first of the next, and a wrong
  link would keep an unrelated block as long as its "child" stays.

Order: evictable leaves by the time they were last released or hit (oldest first);
only when every evictable block has a cached child does the oldest of those go. A
heap of ``(has_child, tick, key)`` entries with lazy deletion gives both in O(log n);
a block gets a fresh entry whenever its tick or leaf state changes, and stale ones
are skipped when popped and purged when they outnumber the live ones.
"""

from __future__ import annotations

import heapq
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.policy import EvictionPolicy

from .options import reject_unknown

__all__ = ["PrefixLRUPolicy"]


class PrefixLRUPolicy(EvictionPolicy):
    """LRU among the leaves of the prefix tree; a parent outlives its cached children."""

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("prefix", options, ())
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"prefix: capacity must be at least one block, got {capacity!r}")
        super().__init__(capacity)
        self._parent: dict[SequenceHash, SequenceHash] = {}
        self._children: dict[SequenceHash, set[SequenceHash]] = {}  # cached children only
        self._known: set[SequenceHash] = set()  # evictable and pinned
        self._tick: dict[SequenceHash, int] = {}  # evictable keys -> last release or hit
        self._heap: list[tuple[int, int, SequenceHash]] = []
        self._clock = 0
        self._chain: SequenceHash | None = None  # the block a new block would follow
        self._pinned_last: SequenceHash | None = None  # the last call pinned this block
        self._inserted_last: SequenceHash | None = None  # the last call inserted this block

    def parent(self, key: SequenceHash) -> SequenceHash | None:
        """The block this one was taken to follow, while both are cached."""
        return self._parent.get(key)

    def _push(self, key: SequenceHash) -> None:
        self._clock += 1
        self._tick[key] = self._clock
        heapq.heappush(self._heap, (1 if key in self._children else 0, self._clock, key))
        if len(self._heap) > 2 * len(self._tick) + 64:
            # Stale entries would grow the heap without bound under heavy touching.
            kids = self._children
            self._heap = [(1 if k in kids else 0, t, k) for k, t in self._tick.items()]
            heapq.heapify(self._heap)

    def _relabel(self, key: SequenceHash) -> None:
        # ``key`` gained its first cached child or lost its last: its heap entry must
        # say so; the tick stays (a change of leaf state is not a use).
        t = self._tick.get(key)
        if t is not None:
            heapq.heappush(self._heap, (1 if key in self._children else 0, t, key))

    def _link(self, child: SequenceHash, parent: SequenceHash | None) -> None:
        old = self._parent.get(child)
        if old == parent:
            return
        if old is not None:
            del self._parent[child]
            kids = self._children.get(old)
            if kids is not None:
                kids.discard(child)
                if not kids:
                    del self._children[old]
                    self._relabel(old)
        if parent is not None and parent != child and parent in self._known:
            self._parent[child] = parent
            kids = self._children.get(parent)
            if kids is None:
                self._children[parent] = {child}
                self._relabel(parent)
            else:
                kids.add(child)

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        if key in self._known:  # re-registered while known: it is a new use
            self._forget(key)
        self._known.add(key)
        chain = self._chain
        if chain is not None:
            self._link(key, chain)
            self._chain = key
        self._pinned_last = None
        self._inserted_last = key
        self._push(key)

    def touch(self, key: SequenceHash) -> None:
        if key in self._tick:
            self._push(key)

    def pin(self, key: SequenceHash) -> None:
        self._tick.pop(key, None)
        if self._inserted_last != key:
            # A match: the block pinned just before is the parent; none makes a root.
            self._link(key, self._pinned_last)
        self._pinned_last = key
        self._inserted_last = None
        self._chain = key

    def unpin(self, key: SequenceHash) -> None:
        if key not in self._known:
            self.insert(key)
        else:
            self._push(key)
        self._chain = self._pinned_last = self._inserted_last = None

    def remove(self, key: SequenceHash) -> None:
        if key in self._tick:
            self._forget(key)
        self._chain = self._pinned_last = self._inserted_last = None

    def victim(self) -> SequenceHash | None:
        heap, tick, children = self._heap, self._tick, self._children
        while heap:
            inner, t, key = heapq.heappop(heap)
            if tick.get(key) == t and inner == (1 if key in children else 0):
                self._forget(key)
                return key
        return None

    def __len__(self) -> int:
        return len(self._tick)

    def _forget(self, key: SequenceHash) -> None:
        self._tick.pop(key, None)
        self._known.discard(key)
        if key in (self._chain, self._pinned_last, self._inserted_last):
            self._chain = self._pinned_last = self._inserted_last = None
        self._link(key, None)
        for c in self._children.pop(key, ()):
            # Orphans: their parent is gone, so nothing above them is cached.
            self._parent.pop(c, None)

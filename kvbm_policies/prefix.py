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

Order: evictable leaves by the time they were last released or hit, oldest first;
only when every evictable block has a cached child does one of those go (roughly the
one that became a parent first). Leaves live in an ordered dict that only ever grows
at its recent end, so it stays in time order at O(1) a call; the one exception, a
parent that turns back into a leaf when its last child goes, keeps its old time in a
small heap beside it, and a victim is the older of the two fronts.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.policy import EvictionPolicy

from .options import reject_unknown

__all__ = ["PrefixLRUPolicy"]

_LEAF, _OLD, _INNER = 0, 1, 2  # where an evictable block is: leaves, the heap, inner


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
        self._where: dict[SequenceHash, int] = {}  # evictable keys -> _LEAF, _OLD or _INNER
        self._leaves: OrderedDict[SequenceHash, None] = OrderedDict()  # by tick, oldest first
        self._old: list[tuple[int, SequenceHash]] = []  # leaves again, at their old tick
        self._inner: OrderedDict[SequenceHash, None] = OrderedDict()
        self._clock = 0
        self._chain: SequenceHash | None = None  # the block a new block would follow
        self._pinned_last: SequenceHash | None = None  # the last call pinned this block
        self._inserted_last: SequenceHash | None = None  # the last call inserted this block

    def parent(self, key: SequenceHash) -> SequenceHash | None:
        """The block this one was taken to follow, while both are cached."""
        return self._parent.get(key)

    def _unplace(self, key: SequenceHash) -> None:
        where = self._where.pop(key, None)
        if where == _LEAF:
            del self._leaves[key]
        elif where == _INNER:
            del self._inner[key]
        # _OLD: the heap entry goes stale (no longer in ``_where`` as _OLD).
        self._tick.pop(key, None)

    def _use(self, key: SequenceHash) -> None:
        # ``key`` enters the evictable set, or is hit while in it: a fresh tick, so it
        # goes to the recent end of its list.
        where = self._where.get(key)
        if where == _LEAF:
            self._leaves.move_to_end(key)
        elif where == _INNER:
            self._inner.move_to_end(key)
        elif key in self._children:
            self._where[key] = _INNER
            self._inner[key] = None
        else:
            self._where[key] = _LEAF
            self._leaves[key] = None
        self._clock += 1
        self._tick[key] = self._clock

    def _became_parent(self, key: SequenceHash) -> None:
        where = self._where.get(key)
        if where == _LEAF:
            del self._leaves[key]
        elif where != _OLD:
            return  # pinned (placed when released) or already inner
        self._where[key] = _INNER
        self._inner[key] = None

    def _became_leaf(self, key: SequenceHash) -> None:
        if self._where.get(key) == _INNER:
            del self._inner[key]
            self._where[key] = _OLD
            heapq.heappush(self._old, (self._tick[key], key))

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
                    self._became_leaf(old)
        if parent is not None and parent != child and parent in self._known:
            self._parent[child] = parent
            kids = self._children.get(parent)
            if kids is None:
                self._children[parent] = {child}
                self._became_parent(parent)
            else:
                kids.add(child)

    # ``insert``, ``touch``, ``pin``, ``unpin`` and ``victim`` run once per access: the
    # common paths of ``_use``, ``_link`` and ``_forget`` are written out in them.
    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        known = self._known
        if key in known:  # re-registered while known: it is a new use
            self._forget(key)
        known.add(key)
        chain = self._chain
        if chain is not None:
            pmap = self._parent
            old = pmap.get(key)
            if old is not None:
                self._link(key, chain)
            elif chain != key and chain in known:  # _link from no parent, inlined
                pmap[key] = chain
                kids = self._children.get(chain)
                if kids is None:
                    self._children[chain] = {key}
                    cw = self._where.get(chain)  # _became_parent, inlined
                    if cw == _LEAF:
                        del self._leaves[chain]
                        self._where[chain] = _INNER
                        self._inner[chain] = None
                    elif cw == _OLD:
                        self._where[chain] = _INNER
                        self._inner[chain] = None
                else:
                    kids.add(key)
            self._chain = key
        self._pinned_last = None
        self._inserted_last = key
        where = self._where
        w = where.get(key)  # _use, inlined
        if w == _LEAF:
            self._leaves.move_to_end(key)
        elif w == _INNER:
            self._inner.move_to_end(key)
        elif key in self._children:
            where[key] = _INNER
            self._inner[key] = None
        else:
            where[key] = _LEAF
            self._leaves[key] = None
        self._clock = c = self._clock + 1
        self._tick[key] = c

    def touch(self, key: SequenceHash) -> None:
        where = self._where.get(key)
        if where is None:
            return
        if where == _LEAF:  # _use, inlined
            self._leaves.move_to_end(key)
        elif where == _INNER:
            self._inner.move_to_end(key)
        elif key in self._children:
            self._where[key] = _INNER
            self._inner[key] = None
        else:
            self._where[key] = _LEAF
            self._leaves[key] = None
        self._clock = c = self._clock + 1
        self._tick[key] = c

    def pin(self, key: SequenceHash) -> None:
        where = self._where.pop(key, None)  # _unplace, inlined: once per hit
        if where is not None:
            if where == _LEAF:
                del self._leaves[key]
            elif where == _INNER:
                del self._inner[key]
            del self._tick[key]
        last = self._pinned_last
        if self._inserted_last != key and self._parent.get(key) != last:
            # A match: the block pinned just before is the parent; none makes a root.
            self._link(key, last)
        self._pinned_last = self._chain = key
        self._inserted_last = None

    def unpin(self, key: SequenceHash) -> None:
        if key not in self._known:
            self.insert(key)
        else:
            where = self._where.get(key)  # _use, inlined
            if where == _LEAF:
                self._leaves.move_to_end(key)
            elif where == _INNER:
                self._inner.move_to_end(key)
            elif key in self._children:
                self._where[key] = _INNER
                self._inner[key] = None
            else:
                self._where[key] = _LEAF
                self._leaves[key] = None
            self._clock = c = self._clock + 1
            self._tick[key] = c
        self._chain = self._pinned_last = self._inserted_last = None

    def remove(self, key: SequenceHash) -> None:
        if key in self._where:
            self._forget(key)
        self._chain = self._pinned_last = self._inserted_last = None

    def victim(self) -> SequenceHash | None:
        old, where, tick = self._old, self._where, self._tick
        while old and not (where.get(old[0][1]) == _OLD and tick[old[0][1]] == old[0][0]):
            heapq.heappop(old)  # stale: used, pinned or gone since it was pushed
        leaves = self._leaves
        if old and (not leaves or old[0][0] < tick[next(iter(leaves))]):
            key = heapq.heappop(old)[1]
            del where[key]
        elif leaves:
            key = next(iter(leaves))
            del where[key]
            del leaves[key]
        elif self._inner:
            key = next(iter(self._inner))
            self._forget(key)
            return key
        else:
            return None
        # _forget, inlined for a leaf (no cached children): unplace, unlink.
        del tick[key]
        self._known.discard(key)
        if key == self._chain or key == self._pinned_last or key == self._inserted_last:
            self._chain = self._pinned_last = self._inserted_last = None
        parent = self._parent.pop(key, None)
        if parent is not None:
            children = self._children
            kids = children.get(parent)
            if kids is not None:
                kids.discard(key)
                if not kids:
                    del children[parent]
                    if where.get(parent) == _INNER:  # _became_leaf, inlined
                        del self._inner[parent]
                        where[parent] = _OLD
                        heapq.heappush(old, (tick[parent], parent))
        return key

    def __len__(self) -> int:
        return len(self._where)

    def _forget(self, key: SequenceHash) -> None:
        self._unplace(key)
        self._known.discard(key)
        if key in (self._chain, self._pinned_last, self._inserted_last):
            self._chain = self._pinned_last = self._inserted_last = None
        self._link(key, None)
        for c in self._children.pop(key, ()):
            # Orphans: their parent is gone, so nothing above them is cached.
            self._parent.pop(c, None)

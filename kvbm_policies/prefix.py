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
        # Evictable keys -> ``tick << 2 | place``: the time of the last release or hit,
        # and _LEAF, _OLD or _INNER (one dict for both: one lookup per call).
        self._where: dict[SequenceHash, int] = {}
        self._leaves: OrderedDict[SequenceHash, None] = OrderedDict()  # by tick, oldest first
        # Leaves again, at their old tick: (``_where`` value, key), stale once it differs.
        self._old: list[tuple[int, SequenceHash]] = []
        self._inner: OrderedDict[SequenceHash, None] = OrderedDict()
        self._clock = 0
        self._chain: SequenceHash | None = None  # the block a new block would follow
        self._pinned_last: SequenceHash | None = None  # the last call pinned this block
        self._inserted_last: SequenceHash | None = None  # the last call inserted this block

    def parent(self, key: SequenceHash) -> SequenceHash | None:
        """The block this one was taken to follow, while both are cached."""
        return self._parent.get(key)

    def _unplace(self, key: SequenceHash) -> None:
        w = self._where.pop(key, None)
        if w is not None:
            if w & 3 == _LEAF:
                del self._leaves[key]
            elif w & 3 == _INNER:
                del self._inner[key]
            # _OLD: the heap entry goes stale (no longer in ``_where`` as _OLD).

    def _use(self, key: SequenceHash) -> None:
        # ``key`` enters the evictable set, or is hit while in it: a fresh tick, so it
        # goes to the recent end of its list.
        w = self._where.get(key)
        self._clock = c = self._clock + 1
        if w is not None and w & 3 == _LEAF:
            self._leaves.move_to_end(key)
            self._where[key] = c << 2 | _LEAF
        elif w is not None and w & 3 == _INNER:
            self._inner.move_to_end(key)
            self._where[key] = c << 2 | _INNER
        elif key in self._children:
            self._where[key] = c << 2 | _INNER
            self._inner[key] = None
        else:
            self._where[key] = c << 2 | _LEAF
            self._leaves[key] = None

    def _became_parent(self, key: SequenceHash) -> None:
        w = self._where.get(key)
        if w is None or w & 3 == _INNER:
            return  # pinned (placed when released) or already inner
        if w & 3 == _LEAF:
            del self._leaves[key]
        self._where[key] = w - (w & 3) + _INNER
        self._inner[key] = None

    def _became_leaf(self, key: SequenceHash) -> None:
        w = self._where.get(key)
        if w is not None and w & 3 == _INNER:
            del self._inner[key]
            self._where[key] = w = w - _INNER + _OLD
            heapq.heappush(self._old, (w, key))

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
                    if cw is not None and cw & 3 != _INNER:
                        if cw & 3 == _LEAF:
                            del self._leaves[chain]
                        self._where[chain] = cw - (cw & 3) + _INNER
                        self._inner[chain] = None
                else:
                    kids.add(key)
            self._chain = key
        self._pinned_last = None
        self._inserted_last = key
        where = self._where
        w = where.get(key)  # _use, inlined
        self._clock = c = self._clock + 1
        if w is None or w & 3 == _OLD:
            if key in self._children:
                where[key] = c << 2 | _INNER
                self._inner[key] = None
            else:
                where[key] = c << 2 | _LEAF
                self._leaves[key] = None
        elif w & 3 == _LEAF:
            self._leaves.move_to_end(key)
            where[key] = c << 2 | _LEAF
        else:
            self._inner.move_to_end(key)
            where[key] = c << 2 | _INNER

    def touch(self, key: SequenceHash) -> None:
        where = self._where
        if key not in where:
            return
        w = where[key]  # _use, inlined
        self._clock = c = self._clock + 1
        if w is None or w & 3 == _OLD:
            if key in self._children:
                where[key] = c << 2 | _INNER
                self._inner[key] = None
            else:
                where[key] = c << 2 | _LEAF
                self._leaves[key] = None
        elif w & 3 == _LEAF:
            self._leaves.move_to_end(key)
            where[key] = c << 2 | _LEAF
        else:
            self._inner.move_to_end(key)
            where[key] = c << 2 | _INNER

    def pin(self, key: SequenceHash) -> None:
        w = self._where.pop(key, None)  # _unplace, inlined: once per hit
        if w is not None:
            if w & 3 == _LEAF:
                del self._leaves[key]
            elif w & 3 == _INNER:
                del self._inner[key]
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
            where = self._where
            w = where.get(key)  # _use, inlined
            self._clock = c = self._clock + 1
            if w is None or w & 3 == _OLD:
                if key in self._children:
                    where[key] = c << 2 | _INNER
                    self._inner[key] = None
                else:
                    where[key] = c << 2 | _LEAF
                    self._leaves[key] = None
            elif w & 3 == _LEAF:
                self._leaves.move_to_end(key)
                where[key] = c << 2 | _LEAF
            else:
                self._inner.move_to_end(key)
                where[key] = c << 2 | _INNER
        self._chain = self._pinned_last = self._inserted_last = None

    def remove(self, key: SequenceHash) -> None:
        if key in self._where:
            self._forget(key)
        self._chain = self._pinned_last = self._inserted_last = None

    def victim(self) -> SequenceHash | None:
        old, where = self._old, self._where
        while old and where.get(old[0][1]) != old[0][0]:
            heapq.heappop(old)  # stale: used, pinned or gone since it was pushed
        leaves = self._leaves
        if old and (not leaves or old[0][0] < where[next(iter(leaves))]):
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
                    w = where.get(parent)  # _became_leaf, inlined
                    if w is not None and w & 3 == _INNER:
                        del self._inner[parent]
                        where[parent] = w = w - _INNER + _OLD
                        heapq.heappush(old, (w, parent))
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

"""Eviction policies: LFU with dynamic aging, priority-then-LRU, ARC and S3-FIFO.

All follow ``kvbm.policy.EvictionPolicy``: the registry tells a policy when a block
becomes evictable (``insert``, ``unpin``), stops being evictable (``pin``, ``remove``)
and is hit (``touch``, usually while pinned). ``victim`` only ever returns a key from
the evictable set, so a pinned block is never chosen.

A policy keeps what it knows about a pinned block (its count, its list) in a side map
while it is pinned, so a hit during a pin still counts. A block committed pinned (the
write-through cascade) may be unpinned without an ``insert`` first; it then enters as
a new block with priority 0.

Every operation is O(1) amortized, except the priority order, O(log n) through a
heap, and LFU's, O(log n) only when a value first gets a bucket. Ordered dicts stand
in for intrusive lists: a move to the end allocates nothing new in CPython.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.policy import EvictionPolicy

from .options import float_option, reject_unknown

__all__ = ["ARCPolicy", "LFUPolicy", "LIRSPolicy", "PriorityLRUPolicy", "S3FIFOPolicy"]


def _check_capacity(policy: str, capacity: int) -> int:
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"{policy}: capacity must be at least one block, got {capacity!r}")
    return capacity


class LFUPolicy(EvictionPolicy):
    """Least frequently used first, with dynamic aging (LFU-DA).

    A block's value is ``age + hits``, where ``age`` is the value of the last block
    evicted. Old counts thus stop protecting a block once newer blocks have been hit
    as often since, without an O(n) halving pass. Ties go to the least recently
    released. Evictable blocks sit in one ordered dict per value (oldest release
    first); a small heap holds the values that have a bucket, so a call moves a key
    between two buckets in O(1) and only a new value costs a heap push.
    """

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("lfu", options, ())
        super().__init__(_check_capacity("lfu", capacity))
        self._age = 0
        self._value: dict[SequenceHash, int] = {}  # evictable key -> its bucket's value
        self._count: dict[SequenceHash, int] = {}  # key -> hits, evictable or pinned
        self._buckets: dict[int, OrderedDict[SequenceHash, None]] = {}
        self._values: list[int] = []  # heap of the values in ``_buckets``

    def _place(self, key: SequenceHash, value: int) -> None:
        self._value[key] = value
        b = self._buckets.get(value)
        if b is None:
            b = self._buckets[value] = OrderedDict()
            heapq.heappush(self._values, value)
        b[key] = None

    # ``_place`` is written out in ``insert``, ``touch`` and ``unpin``: once per access.
    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        value, buckets = self._value, self._buckets
        v = value.pop(key, None)
        if v is not None:  # re-registered while evictable: a new block
            del buckets[v][key]
        self._count[key] = 1
        nv = value[key] = self._age + 1
        b = buckets.get(nv)
        if b is None:
            b = buckets[nv] = OrderedDict()
            heapq.heappush(self._values, nv)
        b[key] = None

    def touch(self, key: SequenceHash) -> None:
        count = self._count
        c = count.get(key)
        if c is None:
            return
        count[key] = c + 1
        value = self._value
        v = value.pop(key, None)
        if v is not None:
            buckets = self._buckets
            del buckets[v][key]
            nv = value[key] = self._age + c + 1
            b = buckets.get(nv)
            if b is None:
                b = buckets[nv] = OrderedDict()
                heapq.heappush(self._values, nv)
            b[key] = None

    def pin(self, key: SequenceHash) -> None:
        v = self._value.pop(key, None)
        if v is not None:
            del self._buckets[v][key]

    def unpin(self, key: SequenceHash) -> None:
        c = self._count.get(key)
        if c is None:
            c = self._count[key] = 1
        value, buckets = self._value, self._buckets
        v = value.pop(key, None)
        if v is not None:
            del buckets[v][key]
        nv = value[key] = self._age + c
        b = buckets.get(nv)
        if b is None:
            b = buckets[nv] = OrderedDict()
            heapq.heappush(self._values, nv)
        b[key] = None

    def remove(self, key: SequenceHash) -> None:
        v = self._value.pop(key, None)
        if v is not None:
            del self._buckets[v][key]
            del self._count[key]

    def victim(self) -> SequenceHash | None:
        values, buckets = self._values, self._buckets
        while values:
            value = values[0]
            b = buckets[value]
            if b:
                key = b.popitem(last=False)[0]
                del self._value[key]
                del self._count[key]
                self._age = value
                return key
            heapq.heappop(values)  # an emptied bucket: drop it
            del buckets[value]
        return None

    def __len__(self) -> int:
        return len(self._value)


class PriorityLRUPolicy(EvictionPolicy):
    """Lowest priority first, then least recently released (Dynamo's order).

    One ordered dict per priority level; a heap of the levels that may be non-empty
    finds the lowest in O(log levels). A block keeps the priority it was inserted
    with while pinned.
    """

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("priority", options, ())
        super().__init__(_check_capacity("priority", capacity))
        self._levels: dict[int, OrderedDict[SequenceHash, None]] = {}
        self._heap: list[int] = []
        self._prio: dict[SequenceHash, int] = {}  # evictable and pinned keys
        self._n = 0

    def _add(self, key: SequenceHash, prio: int) -> None:
        level = self._levels.get(prio)
        if level is None:
            level = self._levels[prio] = OrderedDict()
            heapq.heappush(self._heap, prio)
        if key not in level:
            self._n += 1
        level[key] = None
        level.move_to_end(key)

    def _drop(self, key: SequenceHash) -> bool:
        prio = self._prio.get(key)
        if prio is None:
            return False
        level = self._levels.get(prio)
        if level is not None and level.pop(key, 0) is None:
            self._n -= 1
            return True
        return False

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        self._drop(key)
        self._prio[key] = int(priority)
        self._add(key, int(priority))

    def touch(self, key: SequenceHash) -> None:
        prio = self._prio.get(key)
        if prio is not None:
            level = self._levels.get(prio)
            if level is not None and key in level:
                level.move_to_end(key)

    def pin(self, key: SequenceHash) -> None:
        self._drop(key)

    def unpin(self, key: SequenceHash) -> None:
        prio = self._prio.setdefault(key, 0)
        self._add(key, prio)

    def remove(self, key: SequenceHash) -> None:
        if self._drop(key):
            del self._prio[key]

    def victim(self) -> SequenceHash | None:
        while self._heap:
            prio = self._heap[0]
            level = self._levels[prio]
            if level:
                key = level.popitem(last=False)[0]
                del self._prio[key]
                self._n -= 1
                return key
            # Empty level: forget it so the heap holds only levels in use.
            heapq.heappop(self._heap)
            del self._levels[prio]
        return None

    def __len__(self) -> int:
        return self._n


_T1, _T2 = 1, 2


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo and Modha, FAST 2003).

    T1 holds blocks seen once, T2 blocks hit again; ghost lists B1 and B2 remember
    recently evicted keys of each. A miss that finds its key in B1 grows T1's target
    size ``p``, one in B2 shrinks it; ``victim`` evicts from T1 while T1 is above
    ``p``, else from T2. Only evictable blocks sit in T1/T2; pinned ones are noted
    with their list and go back to its most recent end when released.
    """

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("arc", options, ())
        super().__init__(_check_capacity("arc", capacity))
        self._t1: OrderedDict[SequenceHash, None] = OrderedDict()
        self._t2: OrderedDict[SequenceHash, None] = OrderedDict()
        self._b1: OrderedDict[SequenceHash, None] = OrderedDict()
        self._b2: OrderedDict[SequenceHash, None] = OrderedDict()
        self._pinned: dict[SequenceHash, int] = {}  # pinned key -> _T1 or _T2
        self._pinned_t1 = 0
        self._p = 0.0

    @property
    def target_t1(self) -> float:
        """ARC's adaptive target size of T1, in blocks."""
        return self._p

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        b1, b2 = self._b1, self._b2
        if key in b1:
            self._p = min(float(self.capacity), self._p + max(len(b2) / len(b1), 1.0))
            del b1[key]
            self._t2[key] = None
        elif key in b2:
            self._p = max(0.0, self._p - max(len(b1) / len(b2), 1.0))
            del b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        # _trim_ghosts, written out: once per miss.
        c = self.capacity
        t1 = self._t1
        n1 = len(t1) + self._pinned_t1
        while b1 and n1 + len(b1) > c:
            b1.popitem(last=False)
        resident = len(t1) + len(self._t2) + len(self._pinned)
        while b2 and resident + len(b1) + len(b2) > 2 * c:
            b2.popitem(last=False)

    def _trim_ghosts(self) -> None:
        c = self.capacity
        t1 = len(self._t1) + self._pinned_t1
        while self._b1 and t1 + len(self._b1) > c:
            self._b1.popitem(last=False)
        resident = len(self._t1) + len(self._t2) + len(self._pinned)
        while self._b2 and resident + len(self._b1) + len(self._b2) > 2 * c:
            self._b2.popitem(last=False)

    def touch(self, key: SequenceHash) -> None:
        where = self._pinned.get(key)
        if where is not None:
            if where == _T1:
                self._pinned[key] = _T2
                self._pinned_t1 -= 1
            return
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def pin(self, key: SequenceHash) -> None:
        if self._t1.pop(key, 0) is None:
            self._pinned[key] = _T1
            self._pinned_t1 += 1
        elif self._t2.pop(key, 0) is None:
            self._pinned[key] = _T2

    def unpin(self, key: SequenceHash) -> None:
        where = self._pinned.pop(key, None)
        if where is None:
            self.insert(key)
        elif where == _T1:
            self._pinned_t1 -= 1
            self._t1[key] = None
        else:
            self._t2[key] = None

    def remove(self, key: SequenceHash) -> None:
        if self._t1.pop(key, 0) is None:
            return
        self._t2.pop(key, None)

    def victim(self) -> SequenceHash | None:
        t1, t2 = self._t1, self._t2
        if t1 and (len(t1) + self._pinned_t1 > self._p or not t2):
            key = t1.popitem(last=False)[0]
            self._b1[key] = None
        elif t2:
            key = t2.popitem(last=False)[0]
            self._b2[key] = None
        else:
            return None
        # _trim_ghosts, written out: once per eviction.
        c = self.capacity
        b1, b2 = self._b1, self._b2
        n1 = len(t1) + self._pinned_t1
        while b1 and n1 + len(b1) > c:
            b1.popitem(last=False)
        resident = len(t1) + len(t2) + len(self._pinned)
        while b2 and resident + len(b1) + len(b2) > 2 * c:
            b2.popitem(last=False)
        return key

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small FIFO, a main FIFO and a ghost FIFO.

    New blocks enter the small queue (or main, if the ghost queue remembers them).
    Evicting from small moves a block hit at least ``promote_at`` times to main and
    drops the rest, remembering them in the ghost queue; evicting from main gives a
    block with hits left another lap (its count minus one). Hit counts saturate at
    3. Option ``small_ratio`` (default 0.1) is the small queue's share of capacity.
    """

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("s3fifo", options, ("small_ratio", "promote_at"))
        super().__init__(_check_capacity("s3fifo", capacity))
        ratio = float_option("small_ratio", options.get("small_ratio", 0.1), 0.0, 1.0,
                             lo_open=True, hi_open=True)
        promote = options.get("promote_at", 1)
        if promote not in (1, 2, "1", "2"):
            raise ValueError(f"option 'promote_at': value {promote!r} is out of range; give 1 or 2")
        self._promote = int(promote)
        self._small_target = max(1, int(ratio * capacity))
        self._small: OrderedDict[SequenceHash, None] = OrderedDict()
        self._main: OrderedDict[SequenceHash, None] = OrderedDict()
        self._ghost: OrderedDict[SequenceHash, None] = OrderedDict()
        self._freq: dict[SequenceHash, int] = {}  # evictable and pinned keys
        self._pinned: dict[SequenceHash, bool] = {}  # pinned key -> in main
        self._pinned_small = 0

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        self._freq[key] = 0
        if self._ghost.pop(key, 0) is None:
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: SequenceHash) -> None:
        f = self._freq.get(key)
        if f is not None and f < 3:
            self._freq[key] = f + 1

    def pin(self, key: SequenceHash) -> None:
        if self._small.pop(key, 0) is None:
            self._pinned[key] = False
            self._pinned_small += 1
        elif self._main.pop(key, 0) is None:
            self._pinned[key] = True

    def unpin(self, key: SequenceHash) -> None:
        in_main = self._pinned.pop(key, None)
        if in_main is None:
            if key not in self._freq:
                self.insert(key)
            return
        if in_main:
            self._main[key] = None
        else:
            self._pinned_small -= 1
            self._small[key] = None

    def remove(self, key: SequenceHash) -> None:
        if self._small.pop(key, 0) is None or self._main.pop(key, 0) is None:
            del self._freq[key]

    def victim(self) -> SequenceHash | None:
        small, main, freq = self._small, self._main, self._freq
        while small or main:
            if small and (len(small) + self._pinned_small >= self._small_target or not main):
                key = small.popitem(last=False)[0]
                if freq[key] >= self._promote:
                    main[key] = None
                    continue
                self._ghost[key] = None
                # The ghost queue remembers about as many keys as the cache holds.
                if len(self._ghost) > self.capacity:
                    self._ghost.popitem(last=False)
            else:
                key = next(iter(main))
                f = freq[key]
                if f > 0:
                    freq[key] = f - 1
                    main.move_to_end(key)
                    continue
                del main[key]
            del freq[key]
            return key
        return None

    def __len__(self) -> int:
        return len(self._small) + len(self._main)


_LIR, _HIR, _NONRES = 0, 1, 2


class LIRSPolicy(EvictionPolicy):
    """LIRS (Jiang and Zhang, SIGMETRICS 2002): keep blocks whose reuse distance is short.

    Blocks are LIR (low inter-reference recency, protected) or HIR. The recency stack
    S holds LIR blocks and recently seen HIR ones (resident or not); a queue Q holds
    the resident HIR blocks, which are the ones evicted. A HIR block hit (or missed)
    while still in S was reused sooner than the oldest LIR block and takes its place.
    A loop larger than the cache, the multi-turn pattern where every conversation
    comes back after all the others, thus keeps a stable LIR set instead of
    thrashing as LRU does. Option ``hir_ratio`` (default 0.1, where the paper uses
    0.01) is Q's target share: a request pins its new blocks while they are written,
    and a queue smaller than a request's blocks would push eviction onto LIR blocks.

    Pinned blocks keep their state and stack place; they leave Q (or the LIR order)
    until released. With no evictable HIR block the oldest evictable LIR one goes.
    Non-resident entries in S are bounded by ``capacity``.
    """

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("lirs", options, ("hir_ratio",))
        super().__init__(_check_capacity("lirs", capacity))
        ratio = float_option("hir_ratio", options.get("hir_ratio", 0.1), 0.0, 1.0,
                             lo_open=True, hi_open=True)
        self._lir_max = max(1, capacity - max(1, int(ratio * capacity)))
        self._state: dict[SequenceHash, int] = {}
        self._s: OrderedDict[SequenceHash, None] = OrderedDict()  # recency stack, top last
        self._q: OrderedDict[SequenceHash, None] = OrderedDict()  # evictable resident HIR
        self._lir: OrderedDict[SequenceHash, None] = OrderedDict()  # evictable LIR, by recency
        self._nonres: OrderedDict[SequenceHash, None] = OrderedDict()  # non-resident, in S
        self._pinned: set[SequenceHash] = set()
        self._lir_count = 0

    def _prune(self) -> None:
        # S's bottom must be LIR: HIR entries below the oldest LIR block can no longer
        # prove a shorter reuse distance, so they leave S (non-resident ones entirely).
        s, state = self._s, self._state
        while s:
            key = next(iter(s))
            st = state[key]
            if st == _LIR:
                return
            del s[key]
            if st == _NONRES:
                del state[key]
                del self._nonres[key]

    def _to_lir(self, key: SequenceHash) -> None:
        state, stack = self._state, self._s
        state[key] = _LIR
        self._lir_count += 1
        if key in stack:
            stack.move_to_end(key)
        else:
            stack[key] = None
        if key not in self._pinned:
            self._lir[key] = None
        if self._lir_count > self._lir_max:
            self._demote_bottom()
        if state[next(iter(stack))] != _LIR:  # the stack holds ``key``: never empty here
            self._prune()

    def _demote_bottom(self) -> None:
        for key in self._s:
            if self._state[key] == _LIR:
                break
        else:  # pragma: no cover - the count says an LIR block exists
            return
        del self._s[key]
        self._state[key] = _HIR
        self._lir_count -= 1
        if key not in self._pinned:
            del self._lir[key]
            self._q[key] = None

    def _lir_on(self, key: SequenceHash) -> None:
        # _to_lir, with _demote_bottom's common case (S's bottom is LIR, as _prune
        # leaves it) written out: once per miss or HIR hit that joins the LIR set.
        state, stack = self._state, self._s
        state[key] = _LIR
        self._lir_count = n = self._lir_count + 1
        if key in stack:
            stack.move_to_end(key)
        else:
            stack[key] = None
        pinned = self._pinned
        if key not in pinned:
            self._lir[key] = None
        if n > self._lir_max:
            b = next(iter(stack))
            if state[b] == _LIR:
                del stack[b]
                state[b] = _HIR
                self._lir_count = n - 1
                if b not in pinned:
                    del self._lir[b]
                    self._q[b] = None
            else:
                self._demote_bottom()
        if state[next(iter(stack))] != _LIR:  # the stack holds ``key``: never empty here
            self._prune()

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        state = self._state
        st = state.get(key)
        if st == _NONRES:
            del self._nonres[key]
            self._lir_on(key)
        elif st is None and self._lir_count < self._lir_max:
            self._lir_on(key)
        else:
            state[key] = _HIR
            stack = self._s
            if key in stack:
                stack.move_to_end(key)
            else:
                stack[key] = None
            if key not in self._pinned:
                q = self._q
                if key in q:
                    q.move_to_end(key)
                else:
                    q[key] = None

    def touch(self, key: SequenceHash) -> None:
        st = self._state.get(key)
        if st == _LIR:
            stack = self._s
            if next(iter(stack)) == key:  # only the bottom moving can leave HIR entries below
                stack.move_to_end(key)
                if key in self._lir:
                    self._lir.move_to_end(key)
                self._prune()
            else:
                stack.move_to_end(key)
                if key in self._lir:
                    self._lir.move_to_end(key)
        elif st == _HIR:
            if key in self._s:
                self._q.pop(key, None)
                self._lir_on(key)
            else:
                self._s[key] = None
                if key in self._q:
                    self._q.move_to_end(key)

    def pin(self, key: SequenceHash) -> None:
        self._pinned.add(key)
        if self._lir.pop(key, 0) is not None:
            self._q.pop(key, None)

    def unpin(self, key: SequenceHash) -> None:
        self._pinned.discard(key)
        st = self._state.get(key)
        if st == _LIR:
            self._lir[key] = None
        elif st == _HIR:
            self._q[key] = None
        else:
            self.insert(key)

    def remove(self, key: SequenceHash) -> None:
        st = self._state.pop(key, None)
        if st is None:
            return
        self._s.pop(key, None)
        if st == _LIR:
            self._lir_count -= 1
            self._lir.pop(key, None)
            self._prune()
        else:
            self._q.pop(key, None)

    def victim(self) -> SequenceHash | None:
        if self._q:
            key = self._q.popitem(last=False)[0]
            if key in self._s:
                self._state[key] = _NONRES
                self._nonres[key] = None
                if len(self._nonres) > self.capacity:
                    old = self._nonres.popitem(last=False)[0]
                    del self._s[old]
                    del self._state[old]
            else:
                del self._state[key]
            return key
        if self._lir:
            key = self._lir.popitem(last=False)[0]
            state, stack = self._state, self._s
            del state[key]
            del stack[key]
            self._lir_count -= 1
            if stack and state[next(iter(stack))] != _LIR:
                self._prune()
            return key
        return None

    def __len__(self) -> int:
        return len(self._q) + len(self._lir)

"""Eviction and admission contracts, with the core's defaults (LRU, admit-all).

An eviction policy sees only a tier's *evictable* blocks: registered and unpinned.
The registry tells it when a block enters that set (``insert``, ``unpin``), leaves it
(``pin``, ``remove``) and is hit (``touch``); ``victim`` picks one block to drop and
forgets it. A policy therefore cannot evict a pinned block: it never holds one.
Policies are called under the manager's lock, once per block, so each call must be
O(1) or O(log n).

A policy may instead keep its state in flat arrays indexed by the registry's slots
(``use_slots``): the registry then calls the ``*_slot`` methods, with slot numbers
and no keys, so a cached block costs the policy a few bytes and no Python object.
The core's LRU does so; a policy that does not is driven by keys, as before.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .hashing import SequenceHash


class EvictionPolicy(abc.ABC):
    """Chooses which evictable block of one tier to drop."""

    def __init__(self, capacity: int, **options: Any) -> None:
        self.capacity = capacity

    @abc.abstractmethod
    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        """A block was registered: it is now evictable (a block committed pinned gets
        ``pin`` right after, so the policy still learns its priority)."""

    @abc.abstractmethod
    def touch(self, key: SequenceHash) -> None:
        """A block was hit by a match (it may be evictable or pinned)."""

    @abc.abstractmethod
    def pin(self, key: SequenceHash) -> None:
        """An evictable block got its first pin: it is no longer evictable."""

    @abc.abstractmethod
    def unpin(self, key: SequenceHash) -> None:
        """A block lost its last pin: it is evictable again ("released")."""

    @abc.abstractmethod
    def remove(self, key: SequenceHash) -> None:
        """An evictable block was removed on purpose (not by ``victim``)."""

    @abc.abstractmethod
    def victim(self) -> SequenceHash | None:
        """Drop and return the block to evict, or None when none is evictable."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of evictable blocks."""

    # -- the slot-indexed form (optional) ---------------------------------------------
    def use_slots(self, capacity: int) -> bool:
        """Offered by a registry of ``capacity`` slots: True to be driven by slot numbers.

        A policy that accepts is called through ``insert_slot`` … ``victim_slot``
        from then on, never through the keyed methods, and ``__len__`` counts the
        slots. The default declines: the registry passes keys.
        """
        return False

    def insert_slot(self, slot: int, priority: int = 0) -> None:
        """``insert`` for the block in ``slot`` (only after ``use_slots`` returned True)."""
        raise NotImplementedError

    def touch_slot(self, slot: int) -> None:
        """``touch`` for the block in ``slot``, which is pinned already (a further hit)."""
        raise NotImplementedError

    def pin_slot(self, slot: int, hit: bool = True) -> None:
        """``pin`` for the block in ``slot``, then ``touch`` unless ``hit`` is False
        (one call where the keyed form makes two: this is the match path)."""
        raise NotImplementedError

    def unpin_slot(self, slot: int) -> None:
        """``unpin`` for the block in ``slot``."""
        raise NotImplementedError

    def remove_slot(self, slot: int) -> None:
        """``remove`` for the block in ``slot``."""
        raise NotImplementedError

    def prefetch_slots(self, slots: np.ndarray) -> None:
        """Optional: read what the ``*_slot`` calls for ``slots`` will use, all at once
        (a numpy gather), before the registry makes them one by one (``pin_run``)."""

    def victim_slot(self) -> int:
        """``victim`` as a slot number: drop and return it, or -1 when none is evictable."""
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used (or released) first.

    Under a registry (``use_slots``) the evictable blocks form an intrusive doubly
    linked list over two ``int32`` arrays indexed by slot, with a sentinel at index
    ``capacity``: 8 bytes per slot, O(1) per operation, no Python object per block
    (the shape of vLLM's ``FreeKVCacheBlockQueue``, in arrays). The head is the
    victim, a release or hit moves a block to the tail. A slot not in the list has
    ``next == -1``. Driven by keys (the policy simulators), it keeps an ordered dict.
    """

    def __init__(self, capacity: int, **options: Any) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[SequenceHash, None] = OrderedDict()
        self._by_slot = False
        self._prev = self._next = np.empty(0, np.int32).data
        self._end = 0  # the sentinel's index (the capacity) once slot-indexed
        self._n = 0

    # -- by key --------------------------------------------------------------------------
    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        self._order[key] = None

    def touch(self, key: SequenceHash) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def pin(self, key: SequenceHash) -> None:
        self._order.pop(key, None)

    def unpin(self, key: SequenceHash) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: SequenceHash) -> None:
        self._order.pop(key, None)

    def victim(self) -> SequenceHash | None:
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return self._n if self._by_slot else len(self._order)

    # -- by slot: the list operations are written out in each method, as a call costs
    # -- as much as the pointer updates themselves on the match path ------------------
    def use_slots(self, capacity: int,
                  links: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """``links``: (prev, next), two ``int32`` arrays of ``capacity + 1`` the registry
        offers in its slot records (a lookup's cache line then holds them too)."""
        if len(self):
            raise ValueError(f"LRUPolicy: already holds {len(self)} blocks of another "
                             "registry; give each tier a policy of its own")
        if links is None:
            links = (np.empty(capacity + 1, np.int32), np.empty(capacity + 1, np.int32))
        prev, nxt = links
        prev[:] = nxt[:] = -1
        nxt[capacity] = prev[capacity] = capacity  # the empty list: the sentinel alone
        self._prev, self._next = prev.data, nxt.data
        self._end = capacity
        self._by_slot = True
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of the slot-indexed arrays (0 when driven by key)."""
        return self._prev.nbytes + self._next.nbytes

    def insert_slot(self, slot: int, priority: int = 0) -> None:
        prev, nxt, end = self._prev, self._next, self._end
        if nxt[slot] < 0:
            tail = prev[end]
            nxt[tail] = slot
            prev[slot] = tail
            nxt[slot] = end
            prev[end] = slot
            self._n += 1

    def touch_slot(self, slot: int) -> None:
        prev, nxt, end = self._prev, self._next, self._end
        n = nxt[slot]
        if n >= 0 and n != end:  # listed, and not already the most recent
            p = prev[slot]
            nxt[p] = n
            prev[n] = p
            tail = prev[end]
            nxt[tail] = slot
            prev[slot] = tail
            nxt[slot] = end
            prev[end] = slot

    def pin_slot(self, slot: int, hit: bool = True) -> None:
        # A hit on a pinned block changes nothing: it is not in the list.
        prev, nxt = self._prev, self._next
        n = nxt[slot]
        if n >= 0:
            p = prev[slot]
            nxt[p] = n
            prev[n] = p
            nxt[slot] = -1
            self._n -= 1

    def unpin_slot(self, slot: int) -> None:
        prev, nxt, end = self._prev, self._next, self._end
        n = nxt[slot]
        if n >= 0:  # listed already (a release without a pin): move it to the tail
            if n == end:
                return
            p = prev[slot]
            nxt[p] = n
            prev[n] = p
        else:
            self._n += 1
        tail = prev[end]
        nxt[tail] = slot
        prev[slot] = tail
        nxt[slot] = end
        prev[end] = slot

    def remove_slot(self, slot: int) -> None:
        self.pin_slot(slot)

    def prefetch_slots(self, slots: np.ndarray) -> None:
        if self._by_slot:
            np.asarray(self._prev).take(slots)
            np.asarray(self._next).take(slots)

    def victim_slot(self) -> int:
        prev, nxt, end = self._prev, self._next, self._end
        slot = nxt[end]
        if slot == end:
            return -1
        n = nxt[slot]
        nxt[end] = n
        prev[n] = end
        nxt[slot] = -1
        self._n -= 1
        return slot


class AdmissionPolicy(abc.ABC):
    """Decides which offered blocks a tier accepts."""

    def __init__(self, **options: Any) -> None:
        pass

    @abc.abstractmethod
    def admit(
        self, keys: Sequence[SequenceHash], priorities: Sequence[int] | None = None
    ) -> list[bool]:
        """For blocks offered in request order, whether each may be written."""


class AdmitAll(AdmissionPolicy):
    """Accept every block."""

    def admit(
        self, keys: Sequence[SequenceHash], priorities: Sequence[int] | None = None
    ) -> list[bool]:
        return [True] * len(keys)

"""Eviction and admission contracts, with the core's defaults (LRU, admit-all).

An eviction policy sees only a tier's *evictable* blocks: registered and unpinned.
The registry tells it when a block enters that set (``insert``, ``unpin``), leaves it
(``pin``, ``remove``) and is hit (``touch``); ``victim`` picks one block to drop and
forgets it. A policy therefore cannot evict a pinned block: it never holds one.
Policies are called under the manager's lock, once per block, so each call must be
O(1) or O(log n).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

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


class LRUPolicy(EvictionPolicy):
    """Least recently used (or released) first: an ordered dict of evictable keys."""

    def __init__(self, capacity: int, **options: Any) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[SequenceHash, None] = OrderedDict()

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
        return len(self._order)


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

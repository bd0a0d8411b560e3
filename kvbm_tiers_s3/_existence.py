"""What the tier remembers about the bucket, bounded: where blocks live, which are
known absent for a moment, and which stored copies failed their check."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from kvbm.hashing import SequenceHash


@dataclass(frozen=True, slots=True)
class Loc:
    """Where a block lives: object ``obj``, position ``index`` of ``count`` blocks."""

    obj: str
    index: int
    count: int


class ExistenceCache:
    """Bounded answers to "is this block in the bucket, and where?".

    Positive answers are kept until evicted (least recently used first) or found
    wrong by a read; negative answers expire after ``negative_ttl_s`` because another
    instance may upload the block at any time.
    """

    def __init__(self, size: int, negative_ttl_s: float) -> None:
        self.size = size
        self.negative_ttl_s = negative_ttl_s
        self._pos: OrderedDict[bytes, Loc] = OrderedDict()
        self._neg: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Loc | None:
        """Where ``key`` lives, if known."""
        with self._lock:
            loc = self._pos.get(key)
            if loc is not None:
                self._pos.move_to_end(key)
            return loc

    def put(self, key: bytes, loc: Loc) -> None:
        """``key`` lives at ``loc`` (forgets any 'not there' answer)."""
        if self.size <= 0:
            return
        with self._lock:
            self._neg.pop(key, None)
            self._pos[key] = loc
            self._pos.move_to_end(key)
            while len(self._pos) > self.size:
                self._pos.popitem(last=False)

    def drop(self, key: bytes) -> None:
        """Forget every answer about ``key``."""
        with self._lock:
            self._pos.pop(key, None)
            self._neg.pop(key, None)

    def put_missing(self, key: bytes) -> None:
        """``key`` is not in the bucket, for ``negative_ttl_s``."""
        if self.size <= 0 or self.negative_ttl_s <= 0:
            return
        with self._lock:
            self._pos.pop(key, None)
            self._neg[key] = time.monotonic() + self.negative_ttl_s
            self._neg.move_to_end(key)
            while len(self._neg) > self.size:
                self._neg.popitem(last=False)

    def is_missing(self, key: bytes) -> bool:
        """A fresh 'not there' answer is known for ``key``."""
        with self._lock:
            t = self._neg.get(key)
            if t is None:
                return False
            if time.monotonic() >= t:
                del self._neg[key]
                return False
            return True

    def __len__(self) -> int:
        return len(self._pos)


class RecentKeys:
    """A set of at most ``size`` keys; adding to a full one forgets the oldest.

    For marks whose loss costs only a little work, never a wrong answer: a stored
    copy that failed its check and is forgotten here fails it again on the next read
    and is marked again.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._keys: OrderedDict[SequenceHash, None] = OrderedDict()
        self._lock = threading.Lock()

    def add_all(self, keys: list[SequenceHash]) -> None:
        """Mark ``keys``."""
        with self._lock:
            for k in keys:
                self._keys[k] = None
                self._keys.move_to_end(k)
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)

    def any_of(self, keys: list[SequenceHash]) -> bool:
        """Any of ``keys`` is marked."""
        with self._lock:
            return any(k in self._keys for k in keys)

    def remove_all(self, keys: list[SequenceHash]) -> None:
        """Unmark ``keys``."""
        with self._lock:
            for k in keys:
                self._keys.pop(k, None)

    def __len__(self) -> int:
        return len(self._keys)

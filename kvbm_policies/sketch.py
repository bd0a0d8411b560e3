"""A count-min frequency sketch with aging: how often a block was seen lately, in bounded memory.

This is the sketch of TinyLFU (Einziger, Friedman and Manes, 2017) as Caffeine and
Ristretto use it: four rows of 4-bit counters (here one byte each, saturating at 15),
a block's estimate the smallest of its four counters, an increment that raises only
the counters at that minimum (conservative update: fewer overestimates), and a reset
that halves every counter after ``sample`` increments, so that old popularity fades
and a block hot an hour ago does not keep out one hot now.

Memory is ``4 x width`` bytes whatever the number of distinct blocks; W-TinyLFU sizes
the width at four counters per cached block (Caffeine keeps sixteen 4-bit counters per
entry), so a 1M-block tier's sketch is 16 MiB where a dict of counts would be about
100 MiB.

Keys are the 16-byte sequence hashes or, in the simulator, ints; both are mixed by a
multiplicative hash. Never Python's ``hash()``: it is salted per process, and a policy
must pick the same victims in every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["FrequencySketch", "key_hash", "key_int", "sketch_positions"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # odd: multiplication by it is a bijection mod 2**64
_MAX = 15  # Caffeine's 4-bit counters: a block seen 15 times is simply "hot"


def key_int(key: Any) -> int:
    """A block key as an int before mixing: itself, or a hash's bytes read little-endian;
    any other key by a digest of its ``repr``."""
    if isinstance(key, int):
        return int(key)
    if isinstance(key, (bytes, bytearray)):
        return int.from_bytes(key, "little")
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def key_hash(key: Any) -> int:
    """A well-mixed 64-bit hash of a block key, the same in every process.

    An int, or a sequence hash's bytes read as one little-endian int, mixed by a
    multiplication (so that short test keys and consecutive ids spread too); any other
    key by its ``repr``.
    """
    if type(key) is int:
        h = key
    elif isinstance(key, (bytes, bytearray)):
        h = int.from_bytes(key, "little")
    elif isinstance(key, int):
        h = int(key)
    else:
        h = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")
    h = (h * _GOLDEN) & _MASK64
    return h ^ (h >> 31)


def _int_keys(keys: Sequence[Any]) -> tuple[list[int], np.ndarray]:
    """The keys that are ints in [0, 2**63), as a list and as a uint64 array."""
    ints = [k for k in keys if type(k) is int and 0 <= k < 1 << 63]
    return ints, np.fromiter(ints, dtype=np.uint64, count=len(ints))


def sketch_positions(keys: Sequence[Any], mask: int) -> dict[Any, tuple[int, int, int, int]]:
    """Each int key's four counter positions in a sketch of ``mask + 1`` columns, as
    ``FrequencySketch`` derives them from ``key_hash``, for many keys in one numpy pass
    (uint64 arithmetic wraps mod 2**64 as ``key_hash`` masks). Other keys are skipped."""
    ints, k = _int_keys(keys)
    with np.errstate(over="ignore"):
        h = k * np.uint64(_GOLDEN)
    h ^= h >> np.uint64(31)
    m = np.uint64(mask)
    cols = (h & m, (h >> np.uint64(16)) & m, (h >> np.uint64(32)) & m,
            ((h >> np.uint64(48)) ^ (h >> np.uint64(5))) & m)
    return dict(zip(ints, zip(*(c.tolist() for c in cols))))


class FrequencySketch:
    """Approximate access counts (0 to 15) of many keys in ``4 x width`` bytes, with aging.

    ``width`` is rounded up to a power of two (at least 16). ``sample`` increments (by
    default ten per counter of a row, Caffeine's choice) trigger a reset that halves
    every counter.
    """

    def __init__(self, width: int, sample: int | None = None) -> None:
        w = 16
        while w < width:
            w <<= 1
        self.width = w
        self._mask = w - 1
        self.sample = sample if sample is not None else 10 * w
        if self.sample < 1:
            raise ValueError(f"frequency sketch: sample must be at least 1, got {self.sample}")
        self._table = bytearray(4 * w)
        # One view per row: indexing a row saves an addition per counter on every access.
        view = memoryview(self._table)
        self._rows = (view[:w], view[w:2 * w], view[2 * w:3 * w], view[3 * w:])
        self._r0, self._r1, self._r2, self._r3 = self._rows
        self._added = 0
        self.resets = 0

    # Four row positions come from disjoint bit ranges of one 64-bit hash (independent
    # up to a width of 2**16, overlapping but still mixed above). ``frequency`` and
    # ``increment`` inline the positions: they run on every access of W-TinyLFU.

    def estimate(self, key: Any) -> int:
        """The key's estimated count: the smallest of its four counters."""
        return self.frequency(key_hash(key))

    def add(self, key: Any) -> int:
        """Count one access of ``key``; returns its estimate after the increment."""
        return self.increment(key_hash(key))

    def frequency(self, h: int) -> int:
        """``estimate`` of the key whose ``key_hash`` is ``h`` (callers that keep hashes)."""
        m = self._mask
        lo = self._r0[h & m]
        x = self._r1[(h >> 16) & m]
        if x < lo:
            lo = x
        x = self._r2[(h >> 32) & m]
        if x < lo:
            lo = x
        x = self._r3[((h >> 48) ^ (h >> 5)) & m]
        return x if x < lo else lo

    def increment(self, h: int) -> int:
        """``add`` for the key whose ``key_hash`` is ``h``."""
        m = self._mask
        r0, r1, r2, r3 = self._rows
        a = h & m
        b = (h >> 16) & m
        c = (h >> 32) & m
        d = ((h >> 48) ^ (h >> 5)) & m
        ta, tb, tc, td = r0[a], r1[b], r2[c], r3[d]
        lo = ta
        if tb < lo:
            lo = tb
        if tc < lo:
            lo = tc
        if td < lo:
            lo = td
        if lo < _MAX:
            # Conservative update: only counters at the minimum can be too low.
            if ta == lo:
                r0[a] = lo + 1
            if tb == lo:
                r1[b] = lo + 1
            if tc == lo:
                r2[c] = lo + 1
            if td == lo:
                r3[d] = lo + 1
            lo += 1
        self._added += 1
        if self._added >= self.sample:
            self.reset()
        return lo

    def reset(self) -> None:
        """Halve every counter (aging); the count of additions restarts."""
        view = np.frombuffer(self._table, dtype=np.uint8)
        view >>= 1
        self._added = 0
        self.resets += 1

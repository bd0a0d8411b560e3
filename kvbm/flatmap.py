"""The keys of a tier's slots and the index from key to slot, in flat arrays.

A registry of ten million blocks cannot afford a Python object per block (a 16-byte
``bytes`` key alone is 49 bytes, a dict entry and an int more). ``SlotKeys`` keeps
each slot's key as two ``uint64`` words and finds a key's slot through an
open-addressing index of ``int32`` slot numbers: 16 bytes of key and 8 to 16 bytes of
index per slot, allocated once for the tier's capacity, never grown.

The index is linear probing over a power of two of at least twice the capacity
entries, so it is at most half full: a hit reads 1.5 entries on average, a miss 2.5,
and neighbouring entries share a cache line. A key's home entry is its top bits.
Sequence hashes are xxh3-128 or sha256 digests, uniform already, so no further
mixing is paid on every lookup (``sha256`` is the choice where tenants might craft
colliding prompts, as ``kvbm.hashing`` says). Removal shifts the rest of the
cluster back (Knuth's algorithm R) instead of leaving a tombstone, so the index
never degrades however many blocks come and go.

Scalar access goes through ``memoryview``\\ s of numpy arrays: an item costs about as
much as a ``list`` item and returns a plain ``int``, while the arrays stay numpy's
for the rare whole-tier scans (restore, statistics).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SlotKeys", "KEY_BYTES"]

KEY_BYTES = 16
_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1
# Integer keys (the policy simulators and tests name blocks by number) are multiplied
# by an odd constant modulo 2**128, a bijection that spreads consecutive numbers over
# the top bits the index uses; the inverse gives the number back.
_ODD = 0x9E3779B97F4A7C15F39CC0605CEDC835
_ODD_INV = pow(_ODD, -1, 1 << 128)
_from_bytes = int.from_bytes


class SlotKeys:
    """Which key each slot holds, and the slot of a key, for ``capacity`` slots.

    Keys are 16-byte sequence hashes. A table also takes ``int`` keys in
    ``[-2**127, 2**127)`` instead, never both: the first key added fixes the kind,
    and a key of the other kind is then never found and cannot be added.

    A slot's key stays in the arrays after ``remove``; only the index forgets it.
    The caller (the registry) knows which slots are in use.
    """

    __slots__ = ("capacity", "bits", "_shift", "_hshift", "_mask", "_ints",
                 "_lo_np", "_hi_np", "_index_np", "_lo", "_hi", "_index")

    def __init__(self, capacity: int) -> None:
        if not 0 < capacity < 2**31 - 1:
            raise ValueError(f"capacity: a table holds 1 to 2**31 - 2 slots, got {capacity}")
        self.capacity = capacity
        self.bits = max(3, (2 * capacity - 1).bit_length())
        self._shift = 128 - self.bits  # home entry of a key: its top bits
        self._hshift = 64 - self.bits  # the same bits, from the high word
        self._mask = (1 << self.bits) - 1
        self._ints: bool | None = None  # the kind of key, fixed by the first one added
        self._lo_np = np.zeros(capacity, np.uint64)
        self._hi_np = np.zeros(capacity, np.uint64)
        self._index_np = np.full(1 << self.bits, -1, np.int32)
        self._lo = self._lo_np.data
        self._hi = self._hi_np.data
        self._index = self._index_np.data

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays."""
        return self._lo_np.nbytes + self._hi_np.nbytes + self._index_np.nbytes

    # -- keys as 128-bit codes ---------------------------------------------------------
    def code(self, key: object) -> int:
        """The 128-bit code of ``key``, or -1 when no key of this table can equal it."""
        if key.__class__ is bytes and len(key) == KEY_BYTES and not self._ints:
            return _from_bytes(key, "little")
        if isinstance(key, bytes):
            if len(key) == KEY_BYTES and not self._ints:
                return _from_bytes(key, "little")
            return -1
        if isinstance(key, int) and self._ints and -(1 << 127) <= key < (1 << 127):
            return ((key & _M128) * _ODD) & _M128
        return -1

    def code_to_add(self, key: object) -> int:
        """The code of a key to add; a key of the wrong kind or size is a ``TypeError``."""
        if self._ints is None:
            if isinstance(key, bytes):
                self._ints = False
            elif isinstance(key, int):
                self._ints = True
        code = self.code(key)
        if code < 0:
            want = ("an int in [-2**127, 2**127)" if self._ints
                    else f"a {KEY_BYTES}-byte SequenceHash")
            raise TypeError(f"block key {key!r}: each key of this registry is {want}; "
                            "pass the hashes kvbm's BlockHasher makes")
        return code

    def key_at(self, slot: int) -> Any:
        """The key last added for ``slot`` (bytes, or int in a table of ints)."""
        code = (self._hi[slot] << 64) | self._lo[slot]
        if self._ints:
            k = (code * _ODD_INV) & _M128
            return k - (1 << 128) if k >> 127 else k
        return code.to_bytes(KEY_BYTES, "little")

    # -- the index ----------------------------------------------------------------------
    def find(self, key: object) -> int:
        """Slot of ``key``, or -1."""
        if key.__class__ is bytes and len(key) == KEY_BYTES and not self._ints:
            code = _from_bytes(key, "little")
        else:
            code = self.code(key)
            if code < 0:
                return -1
        return self.find_code(code)

    def find_code(self, code: int) -> int:
        """Slot of the key whose code is ``code``, or -1."""
        index = self._index
        i = code >> self._shift
        s = index[i]
        if s < 0:
            return -1
        lo, hi = code & _M64, code >> 64
        lo_of, hi_of, mask = self._lo, self._hi, self._mask
        while True:
            if lo_of[s] == lo and hi_of[s] == hi:
                return s
            i = (i + 1) & mask
            s = index[i]
            if s < 0:
                return -1

    def add_code(self, code: int, slot: int) -> None:
        """Index ``slot`` under ``code``; the caller checked that the code is absent."""
        index, mask = self._index, self._mask
        i = code >> self._shift
        while index[i] >= 0:
            i = (i + 1) & mask
        index[i] = slot
        self._lo[slot] = code & _M64
        self._hi[slot] = code >> 64

    def remove(self, slot: int) -> None:
        """Forget the index entry of ``slot`` (which must be indexed)."""
        index, hi_of, mask, hs = self._index, self._hi, self._mask, self._hshift
        i = hi_of[slot] >> hs
        while index[i] != slot:
            assert index[i] >= 0, f"slot {slot} is not in the index"
            i = (i + 1) & mask
        # Shift back every later entry of the cluster whose home is not between the
        # hole and itself, so that no probe meets an empty entry before its key.
        j = i
        while True:
            j = (j + 1) & mask
            s = index[j]
            if s < 0:
                break
            if (j - (hi_of[s] >> hs)) & mask >= (j - i) & mask:
                index[i] = s
                i = j
        index[i] = -1

    def __len__(self) -> int:
        """Indexed keys (a scan: for tests and statistics)."""
        return int(np.count_nonzero(self._index_np >= 0))

    def indexed_slots(self) -> np.ndarray:
        """The slots the index holds, in index order (a scan)."""
        return self._index_np[self._index_np >= 0]

    def probe_lengths(self) -> np.ndarray:
        """For each indexed key, how many entries a lookup of it reads (for tests)."""
        pos = np.flatnonzero(self._index_np >= 0)
        home = (self._hi_np[self._index_np[pos]] >> np.uint64(self._hshift)).astype(np.int64)
        return ((pos - home) & self._mask) + 1

"""The keys of a tier's slots and the index from key to slot, in flat arrays.

A registry of ten million blocks cannot afford a Python object per block (a 16-byte
``bytes`` key alone is 49 bytes, a dict entry and an int more). ``SlotKeys`` keeps
each slot's record in one anonymous ``mmap`` (its 16-byte key, then ``extra`` bytes the
caller keeps per slot: the registry's pin count and state, so that the one random
cache line a lookup reads for the key also holds them) and finds a key's slot through
an open-addressing index of ``int32`` slot numbers (8 to 16 bytes a slot), both
allocated once for the tier's capacity, never grown.

The index is linear probing over a power of two of at least twice the capacity
entries, so it is at most half full: a hit reads 1.5 entries on average, a miss 2.5,
and neighbouring entries share a cache line. A key's home entry is the low bits of
Python's own ``hash`` of the key: siphash under a per-process secret, so prompts
crafted to collide cannot pile up in one cluster, and cached in the ``bytes`` object,
so a key looked up in several tiers is hashed once. Removal shifts the rest of the
cluster back (Knuth's algorithm R) instead of leaving a tombstone, so the index never
degrades however many blocks come and go.

Scalar access goes through the ``memoryview`` of a numpy array, which costs about
as much as a ``list`` item and returns a plain ``int``; a key is compared as one
16-byte slice of the mapping. The index never holds a Python object.

``find_prefix`` looks up many keys at once (the blocks of a prefix): numpy reads the
first few index entries from each key's home and the keys of the slots they
name, all in one pass, and compares whole 16-byte keys. A Python loop waits for one
random memory access at a time; a gather issues them together, so in a table far
larger than the caches a run of keys costs about one memory latency, not one per key.
``find_run`` does the same in one compiled call where a C compiler is at hand
(``kvbm._registry_native``), with the same answers.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _registry_native

__all__ = ["KEY_BYTES", "SlotKeys"]

KEY_BYTES = 16
_KEY = np.dtype((np.void, KEY_BYTES))  # one key, compared as its 16 bytes
# Index entries read per key by ``find_prefix``: 4 in an index at most 3/8 full (about
# one key in 180 lies further from its home: those take the scalar probe), 8 in a fuller
# one (a capacity just under a power of two fills it nearly half), where 4 would send
# about one key in 25 to the scalar probe. Each entry read that names another key costs
# a read of that key.
_WINDOWS = {w: np.arange(w, dtype=np.int64) for w in (4, 8)}


class SlotKeys:
    """Which key each slot holds, and the slot of a key, for ``capacity`` slots.

    Keys are 16-byte sequence hashes. A table also takes ``int`` keys in
    ``[-2**127, 2**127)`` instead (the policy simulators and tests name blocks by
    number), never both: the first key added fixes the kind, and a key of the other
    kind is then never found and cannot be added. Integers are stored as their 16
    bytes, little-endian two's complement.

    A slot's key stays in the arrays after ``remove``; only the index forgets it.
    The caller (the registry) knows which slots are in use.
    """

    __slots__ = ("capacity", "stride", "_records", "bits", "slot_mask", "_mask", "home_mask", "_tag_shift",
                 "_tag_mask", "_wbits", "_buckets_np", "_p",
                 "_ints", "_buf", "_index_np", "_index", "_keys_np", "_rec_np", "_steps",
                 "_native", "_params", "_unlinked", "_at")

    def __init__(self, capacity: int, extra: int = 0, tag_bits: int | None = None,
                 spare: int = 0) -> None:
        if not 0 < capacity < 2**31 - 1:
            raise ValueError(f"capacity: a table holds 1 to 2**31 - 2 slots, got {capacity}")
        if extra < 0 or extra % 4:
            raise ValueError(f"extra: bytes per slot after the key, a multiple of 4, got {extra}")
        self.capacity = capacity
        # Each slot's record: its key, then ``extra`` bytes of the caller's (``field``),
        # and ``spare`` records past the last slot that hold no key (the caller's).
        self.stride = KEY_BYTES + extra
        self._records = capacity + spare
        self.bits = max(3, (2 * capacity - 1).bit_length())
        self._mask = (1 << self.bits) - 1
        # An index entry is a slot number, and in the bits above it that slot numbers
        # leave free (7 at 10M slots, none at 2**30), a tag: the next bits of the key's
        # hash after those of its home. ``find_prefix`` reads the record of an entry
        # only when its tag is the key's: a wrong entry costs no random read of a key
        # (1 in 2**tag bits still does, and the whole key is always compared).
        # ``entry & slot_mask`` is the slot; an empty entry is -1. ``tag_bits`` caps the
        # tag (tests: a tag of 1 bit makes collisions common).
        self._tag_shift = max(1, (capacity - 1).bit_length())
        self.slot_mask = (1 << self._tag_shift) - 1
        spare = 31 - self._tag_shift
        self._tag_mask = (1 << (spare if tag_bits is None else min(tag_bits, spare))) - 1
        self._ints: bool | None = None  # the kind of key, fixed by the first one added
        # An anonymous mapping rather than a bytearray: its slices are bytes (a third
        # faster to compare), its pages are touched only when a slot is first used, and
        # it can sit on huge pages, where a random slot's key costs no TLB miss.
        # Private: mmap(-1, n) alone is MAP_SHARED, so that a forked process (an engine
        # worker) would write the keys of its copy of the registry into this one's.
        self._buf = mmap.mmap(-1, self.stride * self._records,
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._buf.madvise(mmap.MADV_HUGEPAGE)
        self._index_np = np.full(1 << self.bits, -1, np.int32)
        w = 4 if 8 * capacity <= 3 << self.bits else 8
        self._steps = _WINDOWS[w]
        # A key's home is the first entry of a bucket of w entries (16 or 32 bytes,
        # aligned): find_prefix reads a key's window as one item that never straddles
        # two cache lines. Probing goes on entry by entry past the bucket, as before.
        self._wbits = w.bit_length() - 1
        self.home_mask = self._mask & ~(w - 1)
        self._buckets_np = self._index_np.view(np.dtype((np.void, 4 * w)))
        self._index = self._index_np.data
        # The same bytes as arrays, for find_prefix: the keys (a strided view), and the
        # whole records, contiguous, which numpy's ``take`` gathers without a copy (a
        # take from a strided array would first copy all of it).
        # What a scalar probe reads, bound as one tuple: one attribute load, not six.
        self._p = (self._index, self.home_mask, self._mask, self.slot_mask, self._buf,
                   self.stride)
        self._keys_np: np.ndarray = np.ndarray((self._records,), _KEY, self._buf,
                                               strides=(self.stride,))
        self._rec_np = np.frombuffer(self._buf, np.dtype(
            {"names": ["k"], "formats": [_KEY], "offsets": [0], "itemsize": self.stride}))
        # The compiled lookup of a run (``kvbm._registry_native``) and the table's
        # parameters it reads: the lookup's here, no state check and no pinning (the
        # registry sets those of its own copy, ``native_params``).
        self._native = _registry_native.load()
        self._params = self.native_params()
        self._unlinked = np.zeros(1, np.int64)
        self._at = (int(self._params.ctypes.data), int(self._unlinked.ctypes.data))

    def native_params(self, **more: int) -> np.ndarray:
        """The ``int64`` parameters of ``kvbm._registry_native`` for this table: the
        lookup's, then ``more`` by name (the rest: no state check, no pinning)."""
        p = dict.fromkeys(_registry_native.PARAMS, 0)
        p.update(index=self._index_np.ctypes.data, home_mask=self.home_mask, mask=self._mask,
                 slot_mask=self.slot_mask, bits=self.bits, tag_shift=self._tag_shift,
                 tag_mask=self._tag_mask, bucket=len(self._steps),
                 records=self._rec_np.ctypes.data, stride=self.stride, state_off=-1,
                 capacity=self.capacity)
        for name, v in more.items():
            assert name in p, name
            p[name] = v
        return np.array([p[name] for name in _registry_native.PARAMS], np.int64)

    @property
    def native(self) -> bool:
        """Whether ``find_run`` uses the compiled lookup."""
        return self._native is not None

    def field(self, offset: int, dtype: type[np.generic]) -> np.ndarray:
        """An array over the ``extra`` bytes of every record, from ``offset`` on: a value
        a slot (and a spare record) that lies in the cache line of its key (zero at
        first)."""
        size = np.dtype(dtype).itemsize
        assert offset >= 0 and offset + size <= self.stride - KEY_BYTES, (offset, dtype)
        return np.ndarray((self._records,), dtype, self._buf, KEY_BYTES + offset,
                          (self.stride,))

    @property
    def ints(self) -> bool:
        """Whether the keys are ints (False until the first key is added)."""
        return bool(self._ints)

    @property
    def probe(self) -> tuple[memoryview, int, int, int, mmap.mmap, int]:
        """(index, home_mask, mask, slot_mask, records, stride): what ``find`` reads, for
        a caller that writes the probe out on its hot path. Key ``k`` (16 bytes) is in
        slot ``s`` when an entry ``e`` from ``hash(k) & home_mask`` on (then ``+ 1 &
        mask``), before the first -1, has ``e & slot_mask == s`` and
        ``buf[stride * s:stride * s + 16] == k``."""
        return self._p

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (the records with their ``extra`` bytes)."""
        return len(self._buf) + self._index_np.nbytes

    # -- keys as stored ------------------------------------------------------------------
    def canon(self, key: object) -> bytes | None:
        """``key`` as stored (its 16 bytes), or None when no key of this table can equal it."""
        if isinstance(key, bytes):
            return None if self._ints else key
        if isinstance(key, int) and self._ints and -(1 << 127) <= key < (1 << 127):
            return key.to_bytes(KEY_BYTES, "little", signed=True)
        return None

    def canon_to_add(self, key: object) -> bytes:
        """``key`` as stored, to add it; a key of the wrong kind or size is a ``TypeError``."""
        if self._ints is None:
            if isinstance(key, bytes):
                self._ints = False
            elif isinstance(key, int):
                self._ints = True
        kb = self.canon(key)
        if kb is None or len(kb) != KEY_BYTES:
            want = ("an int in [-2**127, 2**127)" if self._ints
                    else f"a {KEY_BYTES}-byte SequenceHash")
            raise TypeError(f"block key {key!r}: each key of this registry is {want}; "
                            "pass the hashes kvbm's BlockHasher makes")
        return bytes(kb)

    def key_at(self, slot: int) -> Any:
        """The key last added for ``slot`` (bytes, or int in a table of ints)."""
        o = slot * self.stride
        kb = self._buf[o:o + KEY_BYTES]
        return int.from_bytes(kb, "little", signed=True) if self._ints else kb

    # -- the index ----------------------------------------------------------------------
    def find(self, key: object) -> int:
        """Slot of ``key``, or -1."""
        if key.__class__ is not bytes or self._ints:
            kb = self.canon(key)
            if kb is None:
                return -1
            key = kb
        # A bytes key of another length equals no stored key: no check needed here.
        index, home_mask, mask, slot_mask, buf, stride = self._p
        i = hash(key) & home_mask
        e = index[i]
        while e >= 0:
            s = e & slot_mask
            o = s * stride
            if buf[o:o + 16] == key:
                return s
            i = (i + 1) & mask
            e = index[i]
        return -1

    def find_canon(self, kb: bytes) -> int:
        """Slot of the key stored as ``kb`` (from ``canon``), or -1."""
        index, home_mask, mask, slot_mask, buf, stride = self._p
        i = hash(kb) & home_mask
        e = index[i]
        while e >= 0:
            s = e & slot_mask
            o = s * stride
            if buf[o:o + 16] == kb:
                return s
            i = (i + 1) & mask
            e = index[i]
        return -1

    def find_each(self, keys: Sequence[bytes]) -> list[int]:
        """``find_prefix`` one key at a time, in one call (a small table, in the cache)."""
        index, home_mask, mask, slot_mask, buf, stride = self._p
        out: list[int] = []
        for kb in keys:
            i = hash(kb) & home_mask
            e = index[i]
            while e >= 0:
                s = e & slot_mask
                o = s * stride
                if buf[o:o + 16] == kb:
                    break
                i = (i + 1) & mask
                e = index[i]
            else:
                return out
            out.append(s)
        return out

    def find_run(self, keys: list[bytes]) -> list[int]:
        """``find_prefix(keys).tolist()``: with the compiled lookup when there is one
        (its memory reads issued for all keys together), else ``find_prefix``."""
        if self._native is not None and not self._ints:
            out = self._native(keys, *self._at)
            if out is not None:
                return out
        if not keys or self._ints:
            return []
        return self.find_prefix(keys).tolist()  # type: ignore[no-any-return]

    def find_prefix(self, keys: Sequence[bytes]) -> np.ndarray:
        """Slots of the leading ``keys`` that are indexed, up to the first one that is not.

        Each key is a 16-byte ``bytes`` (as stored). The same answer as ``find_canon``
        key by key: a slot counts only when its whole 16-byte key equals the one
        looked up. An array of slot numbers (``intp``, what numpy indexes fastest with).
        """
        n = len(keys)
        # Each key's home and the entries from it (a hash past 2**63 wraps,
        # which keeps the low bits).
        w = len(self._steps)
        h = np.fromiter(map(hash, keys), np.int64, n)
        home = h & self.home_mask
        home >>= self._wbits
        entries = self._buckets_np.take(home).view(np.int32).reshape(n, w)  # -1 empty
        # Each entry xor the key's tag in the entry's tag bits: an entry whose tag is
        # the key's leaves its slot number, any other (an empty one, -1, included) a
        # number past ``slot_mask`` as unsigned. Then the records of those slots,
        # gathered whole (a key and the caller's bytes of its slot share a cache line:
        # the caller then finds those in the cache), and their keys compared as 16
        # bytes: a tag only rules entries out.
        h >>= self.bits - self._tag_shift
        h &= self._tag_mask << self._tag_shift
        x = entries ^ h[:, None]
        at = np.flatnonzero(x.view(np.uint64) <= self.slot_mask)
        cand = x.ravel()[at]
        mine = at // w  # the key each candidate is for
        same = (self._rec_np.take(cand)["k"]
                == np.frombuffer(b"".join(keys), _KEY).take(mine))
        found: np.ndarray = cand[same]
        if len(found) == n:  # a key is indexed once at most: in order, one a key
            return found
        # The keys not found in their window: absent when the window holds an empty
        # entry, else further on in their cluster (the scalar probe). The run ends at
        # the first absent one.
        slots = np.full(n, -1, np.intp)
        slots[mine[same]] = found
        for i in np.flatnonzero(slots < 0).tolist():
            if -1 in entries[i].tolist():
                return slots[:i]
            slot = self.find_canon(keys[i])
            if slot < 0:
                return slots[:i]
            slots[i] = slot
        return slots

    def same_from(self, start: int, keys: Sequence[bytes]) -> bytes:
        """Whether slot ``start + i`` holds ``keys[i]`` (each a 16-byte ``bytes``): one
        byte each, 1 or 0, for as many keys as there are slots from ``start`` on."""
        end = min(start + len(keys), self.capacity)
        same: bytes = (self._keys_np[start:end]
                       == np.frombuffer(b"".join(keys[:end - start]), _KEY)).tobytes()
        return same

    def add(self, kb: bytes, slot: int) -> None:
        """Index ``slot`` under ``kb`` (from ``canon_to_add``); the caller checked it is absent."""
        index, mask = self._index, self._mask
        h = hash(kb)
        i = h & self.home_mask
        while index[i] >= 0:
            i = (i + 1) & mask
        index[i] = slot | ((h >> self.bits) & self._tag_mask) << self._tag_shift
        o = slot * self.stride
        self._buf[o:o + 16] = kb

    def remove(self, slot: int, kb: bytes | None = None) -> None:
        """Forget the index entry of ``slot`` (which must be indexed); ``kb``: its key
        as stored, when the caller has it at hand."""
        index, home_mask, mask, slot_mask, buf, stride = self._p
        o = slot * stride
        i = hash(kb if kb is not None else buf[o:o + 16]) & home_mask
        e = index[i]
        while e & slot_mask != slot or e < 0:
            assert e >= 0, f"slot {slot} is not in the index"
            i = (i + 1) & mask
            e = index[i]
        # Shift back every later entry of the cluster whose home is not between the
        # hole and itself, so that no probe meets an empty entry before its key.
        j = i
        while True:
            j = (j + 1) & mask
            e = index[j]
            if e < 0:
                break
            o = (e & slot_mask) * stride
            if (j - (hash(buf[o:o + 16]) & home_mask)) & mask >= (j - i) & mask:
                index[i] = e  # the entry moves with its tag
                i = j
        index[i] = -1

    def __len__(self) -> int:
        """Indexed keys (a scan: for tests and statistics)."""
        return int(np.count_nonzero(self._index_np >= 0))

    def indexed_slots(self) -> np.ndarray:
        """The slots the index holds, in index order (a scan)."""
        return self._index_np[self._index_np >= 0] & self.slot_mask

    def tag_of(self, key: object) -> int:
        """The tag an index entry of ``key`` carries (for tests)."""
        kb = self.canon(key)
        assert kb is not None
        return (hash(kb) >> self.bits) & self._tag_mask

    def home_of(self, key: object) -> int:
        """The index entry where a lookup of ``key`` starts (for tests)."""
        kb = self.canon(key)
        assert kb is not None
        return hash(kb) & self.home_mask

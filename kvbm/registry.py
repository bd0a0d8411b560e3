"""The block registry of one tier: which block lives in which slot, and in what state.

A slot is ``FREE``, ``WRITING`` (reserved for a block whose bytes are being written,
not yet matchable) or ``REGISTERED`` (holds the block named by its hash). Registered
blocks carry a pin count; registered unpinned blocks form the evictable cache that
the tier's eviction policy orders. Every operation is O(1) per block.

Everything per slot lives in flat arrays allocated once for the tier's capacity (tens
of bytes a block, not hundreds): a record a slot with its key, pin count (``int32``) and
state (``int8``) in one cache line, the key → slot index (``kvbm.flatmap.SlotKeys``) and
the free slots (an ``int32`` ring used as a stack). A policy that accepts slot numbers
(``EvictionPolicy.use_slots``, as the core's LRU) keeps its state the same way (the
LRU's links in the records); any other policy is handed keys.

A match pins a prefix's blocks with one ``pin_run``: blocks saved together are read
from consecutive slots with no index lookup, the others are looked up together, so that
in a tier of millions of blocks the run's random memory accesses overlap. Where a C
compiler is at hand that is one compiled call (``kvbm._registry_native``), which with
the core's LRU also pins the run (in place in the LRU list: the unlink is finished at
the last unpin or when eviction meets the block), as a batch commit is one call
(``commit_run``); without one, numpy gathers (``SlotKeys.find_prefix``) or, in a small
table, one key at a time, with the same results.

A slot whose write failed goes to the *bottom* of the free stack (``abort(failed=True)``):
it is retried only after every healthy free slot was used, so one dead slot (a
truncated file, a bad sector) cannot take every later write. A block whose read
failed is *doomed*: it is dropped as soon as nobody pins it, so it is never matched
again from this tier.
"""

from __future__ import annotations

import enum
import inspect
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _registry_native
from .events import BlockEvent, EventBus, EventKind
from .flatmap import KEY_BYTES, SlotKeys
from .hashing import SequenceHash
from .policy import EvictionPolicy, LRUPolicy

__all__ = ["BlockRegistry", "SlotState"]

_FREE, _WRITING, _REGISTERED = 0, 1, 2
_MAX_SLOTS = 2**31 - 2
# Keys from which ``pin_run`` looks them up together (below, numpy's fixed cost per
# call is more than the Python probe of each key).
_RUN_MIN = 8
#: Below this many slots the keys and index stay in the CPU's caches and a lookup per
#: key is quicker than numpy's gathers (which also hand the GIL round under load).
_GATHER_MIN_SLOTS = 1 << 18
_REGISTERED_BYTE = bytes([_REGISTERED])  # a slot's state as the int8 array holds it
_IN_USE = bytes([_WRITING, _REGISTERED])


def _no_prefetch(slots: np.ndarray) -> None:
    """A policy without ``prefetch_slots`` (it is optional)."""


class SlotState(enum.IntEnum):
    """Where a slot is in its life."""

    FREE = _FREE
    WRITING = _WRITING
    REGISTERED = _REGISTERED


class BlockRegistry:
    """Slots, states and pins of one tier, with eviction through ``policy``.

    Keys are 16-byte ``SequenceHash`` values (or ints, never mixed with bytes: see
    ``SlotKeys``); the keys handed back (``key_at``, ``evict``, ``registered``, the
    events) are equal to the ones given, not the same objects.
    """

    def __init__(
        self,
        tier: str,
        capacity: int,
        policy: EvictionPolicy,
        events: EventBus | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"tier {tier!r}: capacity must be at least one block, got {capacity}")
        if capacity > _MAX_SLOTS:
            raise ValueError(f"tier {tier!r}: capacity {capacity} blocks exceeds the registry's "
                             f"{_MAX_SLOTS} slots (int32 slot numbers); use larger blocks "
                             "(more tokens per page) or split the tier in two")
        self.tier = tier
        self.capacity = capacity
        self.policy = policy
        self._events = events
        # Each slot's record, 32 bytes: its key, pin count (int32), state (int8) and two
        # int32 for a policy that keeps links by slot (the LRU's prev and next, with its
        # sentinel in a spare record), so that a lookup's one random cache line holds
        # all a match reads of the block (see ``pin_run``).
        self._keys = SlotKeys(capacity, extra=16, spare=1)
        self._find = self._keys.find
        self._probe = self._keys.probe
        self._raw = True  # bytes keys go to the index as they are (not a table of ints)
        self._bytes = False  # the table holds bytes keys (known after the first one)
        # Strided views into the records: read them by fancy indexing, never ``take``
        # (which would copy the whole array first).
        self._pins_np = self._keys.field(0, np.int32)[:capacity]
        self._state_np = self._keys.field(4, np.int8)[:capacity]
        # For scalar reads, the spare record's state too (FREE: it holds no block), so
        # that ``pin``'s guess of the slot after the last one is never out of range.
        self._state = self._keys.field(4, np.int8).data
        self._pins = self._pins_np.data
        # The free slots: a ring of capacity entries holding a stack whose bottom is
        # at ``_bottom``; slot 0 on top at first, as the tiers fill from the front.
        self._ring_np = np.arange(capacity - 1, -1, -1, dtype=np.int32)
        self._ring = self._ring_np.data
        st = np.zeros(5, np.int64)  # the batch allocation's in/out state: ``alloc_state``
        self._alloc = (st.data, int(st.ctypes.data), int(self._ring_np.ctypes.data), st)
        self._bottom = 0
        self._nfree = capacity
        # The slot after the last one pinned: where the next block of a match most
        # likely is (see ``pin``).
        self._guess = 0
        # A policy whose use_slots takes ``links`` (the core's LRU) keeps them in the
        # records; their lines then come with the keys' and need no prefetch.
        self._links_in_records = "links" in inspect.signature(policy.use_slots).parameters
        if self._links_in_records:
            self._by_slot = policy.use_slots(  # type: ignore[call-arg]
                capacity, links=(self._keys.field(8, np.int32), self._keys.field(12, np.int32)))
        else:
            self._by_slot = policy.use_slots(capacity)
        # The compiled lookup of a run (``kvbm._registry_native``: its memory reads
        # issued for all keys together), which also pins the run and takes it out of the
        # LRU list when the policy is the core's LRU with its links in the records; None
        # without a compiler (the numpy and Python paths below, the same results).
        self._lru: LRUPolicy | None = None
        self._native: tuple[_registry_native.RunFn, int, int] | None = None
        fn = _registry_native.load()
        if fn is not None:
            if self._links_in_records and type(policy) is LRUPolicy:
                self._lru = policy
            self._native_params = self._keys.native_params(
                state_off=KEY_BYTES + 4, registered=_REGISTERED, lru=int(self._lru is not None),
                pins_off=KEY_BYTES, prev_off=KEY_BYTES + 8, next_off=KEY_BYTES + 12, end=capacity)
            self._native_unlinked = np.zeros(1, np.int64)
            self._unlinked = self._native_unlinked.data
            self._native = (fn, int(self._native_params.ctypes.data),
                            int(self._native_unlinked.ctypes.data))
        # With the compiled lookup and the core LRU, a block's first pin leaves it in the
        # LRU list (its neighbours' lines untouched on a match; only the evictable count
        # drops): a listed block at its last unpin is moved to the tail (its count back),
        # one the list hands as victim while pinned is passed over (out of the list
        # now), so that the evictable blocks leave in the order an eager unlink gives.
        self._lru_next = (self._keys.field(12, np.int32).data if self._lru is not None
                          else memoryview(b""))
        self._commit_run = _registry_native.commit_fn() if self._lru is not None else None
        if self._by_slot:  # bound once: the match path makes one call per block
            self._pin_slot = policy.pin_slot
            self._touch_slot = policy.touch_slot
            self._unpin_slot = policy.unpin_slot
            self._prefetch_slots = (_no_prefetch if self._links_in_records
                                    else getattr(policy, "prefetch_slots", _no_prefetch))
        # Registered blocks to drop at their last unpin (their read failed): few.
        self._doomed: set[int] = set()
        # Runs of one kind, keyed (run number, kind) in the order they happened: a block
        # evicted and stored again (or stored then evicted) in one batch must reach
        # subscribers in that order, so kinds are never grouped across each other.
        self._pending: dict[tuple[int, EventKind], list[SequenceHash]] = {}
        self._run: list[SequenceHash] | None = None
        self._run_kind: EventKind | None = None
        self.evictions = 0
        self.failed_slots = 0
        self.removed = 0
        # Blocks that left the registry whose storage the tier should forget:
        # (hash, former slot), evicted by the policy and removed on purpose.
        self.last_evicted: list[tuple[SequenceHash, int]] = []
        self.last_removed: list[tuple[SequenceHash, int]] = []

    # -- queries -------------------------------------------------------------
    def lookup(self, key: SequenceHash) -> int | None:
        """Slot of a registered block, or None (absent or still being written)."""
        slot = self._find(key)
        if slot < 0 or self._state[slot] != _REGISTERED:
            return None
        return slot

    def __contains__(self, key: object) -> bool:
        """True for registered and in-flight blocks: both must not be written again."""
        return self._find(key) >= 0

    def key_at(self, slot: int) -> SequenceHash | None:
        if self._state[slot] == _FREE:
            return None
        return self._keys.key_at(slot)  # type: ignore[no-any-return]

    def state_at(self, slot: int) -> SlotState:
        return SlotState(self._state[slot])

    def pins_at(self, slot: int) -> int:
        return self._pins[slot]

    def next_free(self) -> int | None:
        """The slot ``allocate`` hands out next when no eviction is needed, or None."""
        if not self._nfree:
            return None
        return self._ring[(self._bottom + self._nfree - 1) % self.capacity]

    @property
    def num_free(self) -> int:
        return self._nfree

    @property
    def num_used(self) -> int:
        return self.capacity - self._nfree

    @property
    def num_evictable(self) -> int:
        return len(self.policy)

    @property
    def num_pinned(self) -> int:
        """Pins held over all slots (a scan: for stats and tests, not the data path)."""
        return int(self._pins_np.sum(dtype=np.int64))

    @property
    def num_writing(self) -> int:
        """Slots reserved for a write not yet committed or aborted (a scan)."""
        return int(np.count_nonzero(self._state_np == _WRITING))

    @property
    def nbytes(self) -> int:
        """Bytes of the registry's arrays, with the policy's when it keeps them by slot."""
        own = self._keys.nbytes + self._ring_np.nbytes  # the records hold state and pins
        if self._links_in_records:  # and the policy's links
            return own
        return own + int(getattr(self.policy, "nbytes", 0))

    def registered(self) -> Iterator[tuple[SequenceHash, int]]:
        """(hash, slot) of every registered block, in slot order (a scan)."""
        key_at = self._keys.key_at
        for slot in np.flatnonzero(self._state_np == _REGISTERED).tolist():
            yield key_at(slot), slot

    # -- the free stack ---------------------------------------------------------
    def _push_free(self, slot: int) -> None:
        self._ring[(self._bottom + self._nfree) % self.capacity] = slot
        self._nfree += 1

    def _push_free_bottom(self, slot: int) -> None:
        self._bottom = (self._bottom - 1) % self.capacity
        self._ring[self._bottom] = slot
        self._nfree += 1

    def _pop_free(self) -> int:
        self._nfree -= 1
        return self._ring[(self._bottom + self._nfree) % self.capacity]

    # -- transitions ---------------------------------------------------------
    def restore(self, blocks: Iterable[tuple[int, SequenceHash]]) -> int:
        """Register blocks found in storage at start, each in the slot it occupies.

        Called once on an empty registry (a restart). Duplicate keys or slots, slots
        out of range and keys that are no sequence hash are skipped. Returns the
        number restored.
        """
        assert self.num_used == 0, "restore runs only on an empty registry"
        keys, state = self._keys, self._state
        n = 0
        for slot, key in blocks:
            if not 0 <= slot < self.capacity or state[slot] != _FREE:
                continue
            try:
                kb = keys.canon_to_add(key)
            except TypeError:
                continue
            if keys.find_canon(kb) >= 0:
                continue
            state[slot] = _REGISTERED
            keys.add(kb, slot)
            self._raw = self._bytes = not keys.ints
            if self._by_slot:
                self.policy.insert_slot(slot, 0)
            else:
                self.policy.insert(key, 0)
            n += 1
        free = np.flatnonzero(self._state_np == _FREE)[::-1].astype(np.int32)
        self._ring_np[: len(free)] = free
        self._bottom, self._nfree = 0, len(free)
        return n

    def allocate(self, key: SequenceHash) -> int | None:
        """Reserve a slot for ``key`` (state WRITING), evicting if the tier is full.

        Returns None when the tier already has ``key`` or when every slot is pinned or
        in flight; the caller then skips the write. A key that is no sequence hash is
        a ``TypeError``.
        """
        keys = self._keys
        if key.__class__ is bytes and len(key) == KEY_BYTES and self._bytes:
            kb: bytes = key
        else:
            kb = keys.canon_to_add(key)
            self._raw = not keys.ints
            self._bytes = not keys.ints
        if keys.find_canon(kb) >= 0:
            return None
        if not self._nfree and self.evict() is None:
            return None
        self._nfree -= 1
        slot = self._ring[(self._bottom + self._nfree) % self.capacity]
        self._state[slot] = _WRITING
        keys.add(kb, slot)
        if self._events is not None and self._events.active:
            self._emit(EventKind.ALLOCATED, key)
        return slot

    def alloc_state(self) -> tuple[memoryview, int]:
        """``kvbm._allocate_native``'s state (ring address, bottom, free count; the evictable
        and eviction counts it adds), filled in, and its address."""
        st, at, ring, _ = self._alloc
        st[0], st[1], st[2], st[3], st[4] = ring, self._bottom, self._nfree, 0, 0
        return st, at

    def commit(self, slot: int, priority: int = 0, pinned: bool = False) -> None:
        """The slot's bytes are written: the block becomes matchable (and evictable unless pinned)."""
        state = self._state
        assert state[slot] == _WRITING, f"commit of slot {slot} in state {SlotState(state[slot]).name}"
        state[slot] = _REGISTERED
        # Insert even when pinned, so the policy learns the block's priority; the pin
        # takes it out of the evictable set at once until the cascade releases it.
        if self._by_slot:
            self.policy.insert_slot(slot, priority)
            if pinned:
                self._pins[slot] = 1
                self.policy.pin_slot(slot, hit=False)
            if self._events is not None and self._events.active:
                self._emit(EventKind.REGISTERED, self._keys.key_at(slot))
            return
        key = self._keys.key_at(slot)
        self.policy.insert(key, priority)
        if pinned:
            self._pins[slot] = 1
            self.policy.pin(key)
        if self._events is not None and self._events.active:
            self._emit(EventKind.REGISTERED, key)

    def commit_run(self, slots: list[int], priorities: Sequence[int] = (),
                   pinned: bool = False) -> None:
        """``commit(slots[i], priorities[i], pinned)`` for each slot in order: one compiled
        call with the core's LRU in the records and no event subscriber (the LRU takes no
        priority), else the loop; the same states, pins and eviction order."""
        fn = self._commit_run
        if fn is not None and not (self._events is not None and self._events.active):
            at = fn(slots, self._native[1], _WRITING, int(pinned), self._native[2])  # type: ignore[index]
            self._lru._n += self._unlinked[0]  # type: ignore[union-attr]
            if at < 0:
                return
            slots, priorities = slots[at:], priorities[at:]  # the loop asserts on slots[0]
        for i, s in enumerate(slots):
            self.commit(s, priorities[i] if i < len(priorities) else 0, pinned)

    def abort(self, slot: int, failed: bool = False) -> None:
        """The write did not happen: free the slot; the block was never visible.

        ``failed``: the tier tried and failed to write this slot; it goes to the bottom
        of the free stack, retried only when no healthy free slot is left.
        """
        state = self._state
        assert state[slot] == _WRITING, f"abort of slot {slot} in state {SlotState(state[slot]).name}"
        self._keys.remove(slot)
        state[slot] = _FREE
        if failed:
            self.failed_slots += 1
            self._push_free_bottom(slot)
        else:
            self._push_free(slot)

    def pin(self, key: SequenceHash) -> int | None:
        """Pin a registered block (count a hit); return its slot, or None if absent."""
        state = self._state
        if key.__class__ is bytes and self._raw:
            index, home_mask, mask, slot_mask, buf, stride = self._probe
            # The blocks of a request are saved together, into consecutive slots off
            # the free stack, and matched in order: the slot after the last one pinned
            # is first tried, which costs no access to the index (one random memory
            # access per block in a tier of millions). A registered slot holds its key
            # in the index, so a key found there is found right; anything else (no
            # match, a free slot's stale key, a slot past the end) takes the index.
            slot = self._guess
            o = slot * stride
            if not (buf[o:o + 16] == key and state[slot] == _REGISTERED):
                # SlotKeys.find written out: this runs for every block of every match.
                i = hash(key) & home_mask
                e = index[i]
                while e >= 0:
                    slot = e & slot_mask
                    o = slot * stride
                    if buf[o:o + 16] == key:
                        break
                    i = (i + 1) & mask
                    e = index[i]
                else:
                    return None
                if state[slot] != _REGISTERED:
                    return None
        else:
            slot = self._find(key)
            if slot < 0 or state[slot] != _REGISTERED:
                return None
        self._guess = slot + 1
        pins = self._pins
        n = pins[slot]
        pins[slot] = n + 1
        if self._by_slot:
            # One call: pin_slot is the first pin and its hit, touch_slot a later hit.
            if n:
                self._touch_slot(slot)
            else:
                self._pin_slot(slot)
        else:
            if n == 0:
                self.policy.pin(key)
            self.policy.touch(key)
        return slot

    def _find_run(self, keys: list[SequenceHash]) -> np.ndarray:
        """The slots of the longest registered prefix of ``keys`` (whole-key compares)."""
        table = self._keys
        if table.capacity >= _GATHER_MIN_SLOTS:
            return table.find_prefix(keys)
        return np.array(table.find_each(keys), dtype=np.intp)

    def pin_run(self, keys: Sequence[SequenceHash]) -> list[int]:
        """Pin the longest prefix of ``keys`` registered here; return its slots.

        What ``pin`` per key up to the first None does, with the lookups of the whole
        run made at once: in a registry of millions of blocks each lookup is a random
        memory access, and these then overlap instead of following one another
        (``kvbm._registry_native``, else ``SlotKeys.find_prefix``), or, for blocks saved
        together, are not needed (the slot after the last one found is tried first).
        """
        native = self._native
        if native is not None and self._raw:
            if keys.__class__ is not list:
                keys = list(keys)
            fn, params, unlinked = native
            got = fn(keys, params, unlinked)
            if got is not None:
                if self._lru is None:
                    return self._pin_found(got, keys)
                if got:  # pinned in the call, and out of the evictable count
                    self._lru._n -= self._unlinked[0]
                    self._guess = got[-1] + 1
                return got
        n = len(keys)
        out: list[int] = []
        if not (self._raw and n >= _RUN_MIN
                and all(k.__class__ is bytes and len(k) == KEY_BYTES for k in keys)):
            for k in keys:
                slot = self.pin(k)
                if slot is None:
                    break
                out.append(slot)
            return out
        if not isinstance(keys, list):
            keys = list(keys)
        table = self._keys
        first = table.find_canon(keys[0])
        if first < 0:
            return out
        o = (first + 1) * table.stride
        if self._probe[4][o:o + 16] == keys[1]:
            # Blocks saved together sit in consecutive slots: compare the run with the
            # slots from the first one's on (one contiguous read, no index), then look
            # up what follows. A slot counts only while in use: a free one keeps the
            # bytes of the key it last held, which may since live in another slot.
            same = table.same_from(first, keys)
            used = self._state_np[first:first + len(same)].tobytes()
            head = min(len(same) - len(same.lstrip(b"\x01")),
                       len(used) - len(used.lstrip(_IN_USE)))
            found = np.arange(first, first + head, dtype=np.intp)
            if head < n:
                found = np.concatenate((found, self._find_run(keys[head:])))
        elif table.capacity < _GATHER_MIN_SLOTS:
            # A small table (in the cache): one key at a time, each slot's state read as
            # it is found, no numpy.
            state_at = self._state
            out = []
            for slot in table.find_each(keys):
                if state_at[slot] != _REGISTERED:  # one still being written ends the run
                    break
                out.append(slot)
            return self._pin_found(out, keys)
        else:
            found = self._find_run(keys)
        # The state of the run (its pins with it: one record, in the cache since the
        # key compare), and its policy entries read together; the loop below then finds
        # them in the cache.
        state = self._state_np[found].tobytes()
        if self._by_slot:
            self._prefetch_slots(found)
        run = len(state) - len(state.lstrip(_REGISTERED_BYTE))
        if run < len(state):  # one still being written ends the run
            found = found[:run]
        return self._pin_found(found.tolist(), keys)

    def _pin_found(self, out: list[int], keys: list[SequenceHash]) -> list[int]:
        """Pin the registered slots ``out`` of ``keys[:len(out)]``; return ``out``."""
        if not out:
            return out
        pins = self._pins
        if self._by_slot:
            touch_slot, pin_slot = self._touch_slot, self._pin_slot
            for slot in out:
                c = pins[slot]
                pins[slot] = c + 1
                if c:
                    touch_slot(slot)
                else:
                    pin_slot(slot)
        else:
            policy = self.policy
            for slot, key in zip(out, keys):
                c = pins[slot]
                pins[slot] = c + 1
                if c == 0:
                    policy.pin(key)
                policy.touch(key)
        self._guess = out[-1] + 1
        return out

    def unpin(self, slot: int) -> None:
        """Drop one pin; at zero the block is evictable again (or dropped, if doomed)."""
        pins = self._pins
        n = pins[slot]
        assert n > 0, f"unpin of slot {slot} that holds no pin"
        pins[slot] = n - 1
        if n == 1:
            if self._by_slot:
                if self._lru is not None and self._lru_next[slot] >= 0:
                    self._lru._n += 1  # pinned in place (pin_run): evictable again
                self._unpin_slot(slot)
            else:
                self.policy.unpin(self._keys.key_at(slot))
            if self._doomed and slot in self._doomed:
                self._drop(slot, self._keys.key_at(slot))

    def doom(self, key: SequenceHash) -> bool:
        """Drop ``key`` as soon as nobody pins it (its read failed); True if dropped now."""
        slot = self.lookup(key)
        if slot is None:
            return False
        if self._pins[slot]:
            self._doomed.add(slot)
            return False
        self._drop(slot, key)
        return True

    def remove(self, key: SequenceHash) -> bool:
        """Drop an unpinned registered block on purpose; False if absent or pinned."""
        slot = self.lookup(key)
        if slot is None or self._pins[slot]:
            return False
        self._drop(slot, key)
        return True

    def _drop(self, slot: int, key: Any) -> None:
        if self._by_slot:
            self.policy.remove_slot(slot)
        else:
            self.policy.remove(key)
        self._release_slot(slot)
        self.removed += 1
        self._emit(EventKind.REMOVED, key)
        self.last_removed.append((key, slot))

    def evict(self) -> tuple[SequenceHash, int] | None:
        """Evict one block chosen by the policy; return its (hash, former slot)."""
        if self._by_slot:
            slot = self.policy.victim_slot()
            if self._lru is not None:
                while slot >= 0 and self._pins[slot]:
                    # Pinned in place by pin_run, not counted: now out of the list, as
                    # an eager unlink would have left it.
                    self._lru._n += 1
                    slot = self.policy.victim_slot()
            if slot < 0:
                return None
            key = self._keys.key_at(slot)
        else:
            key = self.policy.victim()
            if key is None:
                return None
            slot = self._find(key)
        assert slot >= 0 and self._state[slot] == _REGISTERED and self._pins[slot] == 0, (
            f"policy {type(self.policy).__name__} chose block {key!r} in slot {slot} that is "
            f"{SlotState(self._state[slot]).name if slot >= 0 else 'absent'} with "
            f"{self._pins[slot] if slot >= 0 else 0} pins"
        )
        # _release_slot written out: a full tier evicts once per block it saves.
        self._keys.remove(slot, key if self._bytes else None)
        if self._doomed:
            self._doomed.discard(slot)
        self._state[slot] = _FREE
        self._ring[(self._bottom + self._nfree) % self.capacity] = slot
        self._nfree += 1
        self.evictions += 1
        if self._events is not None and self._events.active:
            self._emit(EventKind.EVICTED, key)
        self.last_evicted.append((key, slot))
        return key, slot

    def _release_slot(self, slot: int) -> None:
        self._keys.remove(slot)
        if self._doomed:
            self._doomed.discard(slot)
        self._state[slot] = _FREE
        self._pins[slot] = 0
        self._push_free(slot)

    # -- events --------------------------------------------------------------
    def _emit(self, kind: EventKind, key: SequenceHash) -> None:
        if self._events is not None and self._events.active:
            if self._run is None or self._run_kind is not kind:
                self._run = self._pending[(len(self._pending), kind)] = []
                self._run_kind = kind
            self._run.append(key)

    def take_events(self) -> list[BlockEvent]:
        """The transitions since the last call, in order: one event per run of one kind."""
        if not self._pending:
            return []
        now = time.time()
        out = [BlockEvent(k, self.tier, tuple(v), now) for (_, k), v in self._pending.items()]
        self._pending = {}
        self._run = self._run_kind = None
        return out

    def take_evicted(self) -> list[tuple[SequenceHash, int]]:
        """(hash, slot) of blocks evicted since the last call, for the tier to discard."""
        out, self.last_evicted = self.last_evicted, []
        return out

    def take_dropped(self) -> list[tuple[SequenceHash, int]]:
        """(hash, slot) of blocks evicted or removed since the last call, for the tier to discard."""
        out = self.last_evicted + self.last_removed
        self.last_evicted, self.last_removed = [], []
        return out

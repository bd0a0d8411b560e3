"""The block registry and LRU policy as they were before the flat arrays (issue 14), kept
only so that ``bench/registry.py`` can measure both side by side; nothing imports it.

The block registry of one tier: which block lives in which slot, and in what state.

A slot is ``FREE``, ``WRITING`` (reserved for a block whose bytes are being written,
not yet matchable) or ``REGISTERED`` (holds the block named by its hash). Registered
blocks carry a pin count; registered unpinned blocks form the evictable cache that
the tier's eviction policy orders. Every operation is O(1) per block: the free slots
are a deque used as a stack, the hash → slot map a dict, the per-slot state flat lists.

A slot whose write failed goes to the *bottom* of the free stack (``abort(failed=True)``):
it is retried only after every healthy free slot was used, so one dead slot (a
truncated file, a bad sector) cannot take every later write. A block whose read
failed is *doomed*: it is dropped as soon as nobody pins it, so it is never matched
again from this tier.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from kvbm.events import BlockEvent, EventBus, EventKind
from kvbm.hashing import SequenceHash
from kvbm.policy import EvictionPolicy


class SlotState(enum.IntEnum):
    """Where a slot is in its life."""

    FREE = 0
    WRITING = 1
    REGISTERED = 2


class OldLRUPolicy(EvictionPolicy):
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


class OldBlockRegistry:
    """Slots, states and pins of one tier, with eviction through ``policy``."""

    def __init__(
        self,
        tier: str,
        capacity: int,
        policy: EvictionPolicy,
        events: EventBus | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"tier {tier!r}: capacity must be at least one block, got {capacity}")
        self.tier = tier
        self.capacity = capacity
        self.policy = policy
        self._events = events
        self._free: deque[int] = deque(range(capacity - 1, -1, -1))
        self._state: list[SlotState] = [SlotState.FREE] * capacity
        self._key: list[SequenceHash | None] = [None] * capacity
        self._pins: list[int] = [0] * capacity
        self._slot_of: dict[SequenceHash, int] = {}
        # Registered blocks to drop once their last pin goes (their read failed).
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
        slot = self._slot_of.get(key)
        if slot is None or self._state[slot] is not SlotState.REGISTERED:
            return None
        return slot

    def __contains__(self, key: object) -> bool:
        """True for registered and in-flight blocks: both must not be written again."""
        return key in self._slot_of

    def key_at(self, slot: int) -> SequenceHash | None:
        return self._key[slot]

    def state_at(self, slot: int) -> SlotState:
        return self._state[slot]

    def pins_at(self, slot: int) -> int:
        return self._pins[slot]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def num_evictable(self) -> int:
        return len(self.policy)

    @property
    def num_pinned(self) -> int:
        """Pins held over all slots (a scan: for stats and tests, not the data path)."""
        return sum(self._pins)

    @property
    def num_writing(self) -> int:
        """Slots reserved for a write not yet committed or aborted (a scan)."""
        return sum(1 for s in self._state if s is SlotState.WRITING)

    def registered(self) -> Iterable[tuple[SequenceHash, int]]:
        """(hash, slot) of every registered block."""
        for key, slot in self._slot_of.items():
            if self._state[slot] is SlotState.REGISTERED:
                yield key, slot

    # -- transitions ---------------------------------------------------------
    def restore(self, blocks: Iterable[tuple[int, SequenceHash]]) -> int:
        """Register blocks found in storage at start, each in the slot it occupies.

        Called once on an empty registry (a restart). Duplicate keys or slots, and
        slots out of range, are skipped. Returns the number restored.
        """
        assert self.num_used == 0, "restore runs only on an empty registry"
        n = 0
        for slot, key in blocks:
            if not 0 <= slot < self.capacity or key in self._slot_of:
                continue
            if self._state[slot] is not SlotState.FREE:
                continue
            self._state[slot] = SlotState.REGISTERED
            self._key[slot] = key
            self._slot_of[key] = slot
            self.policy.insert(key, 0)
            n += 1
        taken = set(self._slot_of.values())
        self._free = deque(s for s in range(self.capacity - 1, -1, -1) if s not in taken)
        return n

    def allocate(self, key: SequenceHash) -> int | None:
        """Reserve a slot for ``key`` (state WRITING), evicting if the tier is full.

        Returns None when the tier already has ``key`` or when every slot is pinned or
        in flight; the caller then skips the write.
        """
        if key in self._slot_of:
            return None
        if not self._free and not self._evict_one():
            return None
        slot = self._free.pop()
        self._state[slot] = SlotState.WRITING
        self._key[slot] = key
        self._slot_of[key] = slot
        self._emit(EventKind.ALLOCATED, key)
        return slot

    def commit(self, slot: int, priority: int = 0, pinned: bool = False) -> None:
        """The slot's bytes are written: the block becomes matchable (and evictable unless pinned)."""
        assert self._state[slot] is SlotState.WRITING, f"commit of slot {slot} in state {self._state[slot].name}"
        key = self._key[slot]
        assert key is not None
        self._state[slot] = SlotState.REGISTERED
        # Insert even when pinned, so the policy learns the block's priority; the pin
        # takes it out of the evictable set at once until the cascade releases it.
        self.policy.insert(key, priority)
        if pinned:
            self._pins[slot] = 1
            self.policy.pin(key)
        self._emit(EventKind.REGISTERED, key)

    def abort(self, slot: int, failed: bool = False) -> None:
        """The write did not happen: free the slot; the block was never visible.

        ``failed``: the tier tried and failed to write this slot; it goes to the bottom
        of the free stack, retried only when no healthy free slot is left.
        """
        assert self._state[slot] is SlotState.WRITING, f"abort of slot {slot} in state {self._state[slot].name}"
        self._release_slot(slot)
        if failed:
            self.failed_slots += 1
            # _release_slot pushed it on top; move it to the bottom.
            self._free.pop()
            self._free.appendleft(slot)

    def pin(self, key: SequenceHash) -> int | None:
        """Pin a registered block (count a hit); return its slot, or None if absent."""
        slot = self.lookup(key)
        if slot is None:
            return None
        if self._pins[slot] == 0:
            self.policy.pin(key)
        self._pins[slot] += 1
        self.policy.touch(key)
        return slot

    def unpin(self, slot: int) -> None:
        """Drop one pin; at zero the block is evictable again (or dropped, if doomed)."""
        assert self._pins[slot] > 0, f"unpin of slot {slot} that holds no pin"
        self._pins[slot] -= 1
        if self._pins[slot] == 0:
            key = self._key[slot]
            assert key is not None
            self.policy.unpin(key)
            if slot in self._doomed:
                self.remove(key)

    def doom(self, key: SequenceHash) -> bool:
        """Drop ``key`` as soon as nobody pins it (its read failed); True if dropped now."""
        slot = self.lookup(key)
        if slot is None:
            return False
        if self._pins[slot]:
            self._doomed.add(slot)
            return False
        return self.remove(key)

    def remove(self, key: SequenceHash) -> bool:
        """Drop an unpinned registered block on purpose; False if absent or pinned."""
        slot = self.lookup(key)
        if slot is None or self._pins[slot]:
            return False
        self.policy.remove(key)
        self._release_slot(slot)
        self.removed += 1
        self._emit(EventKind.REMOVED, key)
        self.last_removed.append((key, slot))
        return True

    def evict(self) -> tuple[SequenceHash, int] | None:
        """Evict one block chosen by the policy; return its (hash, former slot)."""
        key = self.policy.victim()
        if key is None:
            return None
        slot = self._slot_of[key]
        assert self._state[slot] is SlotState.REGISTERED and self._pins[slot] == 0, (
            f"policy {type(self.policy).__name__} chose block in slot {slot} that is "
            f"{self._state[slot].name} with {self._pins[slot]} pins"
        )
        self._release_slot(slot)
        self.evictions += 1
        self._emit(EventKind.EVICTED, key)
        self.last_evicted.append((key, slot))
        return key, slot

    def _evict_one(self) -> bool:
        return self.evict() is not None

    def _release_slot(self, slot: int) -> None:
        key = self._key[slot]
        if key is not None:
            del self._slot_of[key]
        self._doomed.discard(slot)
        self._state[slot] = SlotState.FREE
        self._key[slot] = None
        self._pins[slot] = 0
        self._free.append(slot)

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

"""The block registry, checked against a plain model by a hypothesis state machine."""

from __future__ import annotations

from collections import OrderedDict

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm import registry as registry_mod
from kvbm._registry_native import unpin_run
from kvbm.flatmap import SlotKeys
from kvbm.hashing import SequenceHash
from kvbm.policy import LRUPolicy
from kvbm.registry import BlockRegistry, SlotState

KEYS = [SequenceHash(bytes([i]) * 16) for i in range(12)]
CAPACITY = 5


def new_registry(capacity: int = CAPACITY) -> BlockRegistry:
    return BlockRegistry("t", capacity, LRUPolicy(capacity))


class RegistryMachine(RuleBasedStateMachine):
    """Random sequences of allocate/commit/abort/pin/unpin/remove/evict."""

    def __init__(self) -> None:
        super().__init__()
        self.reg = new_registry()
        self.writing: dict[SequenceHash, int] = {}
        self.registered: dict[SequenceHash, int] = {}  # key -> pins
        self.pins: list[int] = []  # slots holding one pin each

    @rule(key=st.sampled_from(KEYS))
    def allocate(self, key: SequenceHash) -> None:
        evictable_before = {k for k, p in self.registered.items() if p == 0}
        present = key in self.writing or key in self.registered
        full = len(self.writing) + len(self.registered) == CAPACITY
        slot = self.reg.allocate(key)
        if present or (full and not evictable_before):
            assert slot is None
            return
        assert slot is not None
        for k, _ in self.reg.take_evicted():
            assert k in evictable_before, "evicted a pinned or unregistered block"
            del self.registered[k]
        self.writing[key] = slot

    @precondition(lambda self: self.writing)
    @rule(data=st.data(), pinned=st.booleans())
    def commit(self, data: st.DataObject, pinned: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.writing)))
        slot = self.writing.pop(key)
        self.reg.commit(slot, pinned=pinned)
        self.registered[key] = 1 if pinned else 0
        if pinned:
            self.pins.append(slot)

    @precondition(lambda self: self.writing)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.writing)))
        self.reg.abort(self.writing.pop(key))
        assert key not in self.reg

    @rule(key=st.sampled_from(KEYS))
    def pin(self, key: SequenceHash) -> None:
        slot = self.reg.pin(key)
        if key not in self.registered:
            assert slot is None
            return
        assert slot is not None
        self.registered[key] += 1
        self.pins.append(slot)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.pins) - 1))
        slot = self.pins.pop(i)
        key = self.reg.key_at(slot)
        assert key is not None
        self.reg.unpin(slot)
        self.registered[key] -= 1

    @rule(key=st.sampled_from(KEYS))
    def remove(self, key: SequenceHash) -> None:
        expect = self.registered.get(key) == 0
        assert self.reg.remove(key) == expect
        if expect:
            del self.registered[key]

    @rule()
    def evict(self) -> None:
        out = self.reg.evict()
        self.reg.take_evicted()
        evictable = {k for k, p in self.registered.items() if p == 0}
        if not evictable:
            assert out is None
            return
        assert out is not None and out[0] in evictable
        del self.registered[out[0]]

    @invariant()
    def free_plus_used_is_capacity(self) -> None:
        assert self.reg.num_free + self.reg.num_used == CAPACITY
        assert self.reg.num_used == len(self.writing) + len(self.registered)

    @invariant()
    def index_holds_each_used_slot_once_under_its_key(self) -> None:
        slots = self.reg._keys.indexed_slots().tolist()
        assert len(slots) == len(set(slots)) == self.reg.num_used
        for s in slots:
            assert self.reg._keys.find(self.reg.key_at(s)) == s

    @invariant()
    def evictable_set_is_exactly_unpinned_registered(self) -> None:
        assert self.reg.num_evictable == sum(1 for p in self.registered.values() if p == 0)

    @invariant()
    def states_and_pins_agree_with_model(self) -> None:
        for k, pins in self.registered.items():
            slot = self.reg.lookup(k)
            assert slot is not None and self.reg.pins_at(slot) == pins
        for k in self.writing:
            assert self.reg.lookup(k) is None and k in self.reg


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_writing_block_is_not_matchable_until_committed() -> None:
    reg = new_registry()
    slot = reg.allocate(KEYS[0])
    assert slot is not None and reg.lookup(KEYS[0]) is None
    reg.commit(slot)
    assert reg.lookup(KEYS[0]) == slot


def test_allocating_a_present_key_returns_none() -> None:
    reg = new_registry()
    reg.commit(reg.allocate(KEYS[0]))  # type: ignore[arg-type]
    assert reg.allocate(KEYS[0]) is None


def test_full_tier_evicts_least_recently_released_block() -> None:
    reg = new_registry(2)
    for k in KEYS[:2]:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    s = reg.pin(KEYS[0])
    reg.unpin(s)  # type: ignore[arg-type]
    reg.allocate(KEYS[2])
    assert [k for k, _ in reg.take_evicted()] == [KEYS[1]]


def test_full_tier_of_pinned_blocks_refuses_allocation() -> None:
    reg = new_registry(1)
    reg.commit(reg.allocate(KEYS[0]), pinned=True)  # type: ignore[arg-type]
    assert reg.allocate(KEYS[1]) is None


def test_restore_registers_blocks_in_their_own_slots() -> None:
    reg = new_registry(4)
    assert reg.restore([(3, KEYS[0]), (1, KEYS[1]), (1, KEYS[2]), (9, KEYS[3])]) == 2
    assert (reg.lookup(KEYS[0]), reg.lookup(KEYS[1]), reg.num_free) == (3, 1, 2)
    assert reg.state_at(0) is SlotState.FREE


def test_unpin_without_pin_is_an_invariant_violation() -> None:
    reg = new_registry()
    slot = reg.allocate(KEYS[0])
    reg.commit(slot)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="holds no pin"):
        reg.unpin(slot)  # type: ignore[arg-type]


# --- the flat arrays against a plain model, slot for slot and victim for victim ---------

def crowded_keys(capacity: int, homes: list[int], per_home: int) -> list[SequenceHash]:
    """Keys whose lookups all start at one of ``homes`` in the index of a table of
    ``capacity`` slots (Python's hash is seeded per process: chosen at run time)."""
    table = SlotKeys(capacity)
    picked: dict[int, list[SequenceHash]] = {h: [] for h in homes}
    i = 0
    while any(len(v) < per_home for v in picked.values()):
        k = SequenceHash(i.to_bytes(16, "little"))
        got = picked.get(table.home_of(k))
        if got is not None and len(got) < per_home:
            got.append(k)
        i += 1
    return [k for h in homes for k in picked[h]]


# A tier of 5 slots has a 16-entry index of 4-entry buckets: keys crowd onto its first
# and last buckets, so that clusters form and wrap around the end.
EXACT_KEYS = crowded_keys(CAPACITY, [0, 12], 6)


class ExactRegistryMachine(RuleBasedStateMachine):
    """The registry with its LRU must hand out the slots and choose the victims that a
    reference made of a list (free stack), dicts and an OrderedDict (LRU) does."""

    def __init__(self) -> None:
        super().__init__()
        self.reg = new_registry()
        self.free = list(range(CAPACITY - 1, -1, -1))  # top at the end
        self.slot_of: dict[SequenceHash, int] = {}
        self.state: dict[int, str] = {}  # slot -> "w" or "r"
        self.pins: dict[int, int] = {}
        self.lru: OrderedDict[SequenceHash, None] = OrderedDict()
        self.doomed: set[int] = set()
        self.held: list[int] = []  # one entry per pin

    def _key(self, slot: int) -> SequenceHash:
        return next(k for k, s in self.slot_of.items() if s == slot)

    def _release(self, slot: int, bottom: bool = False) -> None:
        del self.slot_of[self._key(slot)]
        del self.state[slot]
        self.pins.pop(slot, None)
        self.doomed.discard(slot)
        if bottom:
            self.free.insert(0, slot)
        else:
            self.free.append(slot)

    def _model_evict(self) -> SequenceHash | None:
        if not self.lru:
            return None
        key = self.lru.popitem(last=False)[0]
        self._release(self.slot_of[key])
        return key

    @rule(key=st.sampled_from(EXACT_KEYS))
    def allocate(self, key: SequenceHash) -> None:
        got = self.reg.allocate(key)
        evicted = [k for k, _ in self.reg.take_evicted()]
        if key in self.slot_of or (not self.free and not self.lru):
            assert got is None and evicted == []
            return
        want_evicted = [] if self.free else [self._model_evict()]
        assert evicted == want_evicted
        slot = self.free.pop()
        assert got == slot
        self.slot_of[key] = slot
        self.state[slot] = "w"

    @precondition(lambda self: any(v == "w" for v in self.state.values()))
    @rule(data=st.data(), pinned=st.booleans())
    def commit(self, data: st.DataObject, pinned: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(s for s, v in self.state.items() if v == "w")))
        self.reg.commit(slot, pinned=pinned)
        self._model_commit(slot, pinned)

    def _model_commit(self, slot: int, pinned: bool) -> None:
        self.state[slot] = "r"
        if pinned:
            self.pins[slot] = 1
            self.held.append(slot)
        else:
            self.lru[self._key(slot)] = None

    @precondition(lambda self: any(v == "w" for v in self.state.values()))
    @rule(data=st.data(), pinned=st.booleans())
    def commit_run(self, data: st.DataObject, pinned: bool) -> None:
        # The batch commit (compiled with the LRU) is the per-slot commit, slot by slot in
        # the order given: the same states, pins and LRU order.
        writing = sorted(s for s, v in self.state.items() if v == "w")
        run = data.draw(st.lists(st.sampled_from(writing), min_size=1, unique=True))
        self.reg.commit_run(run, pinned=pinned)
        for slot in run:
            self._model_commit(slot, pinned)

    @precondition(lambda self: any(v == "w" for v in self.state.values()))
    @rule(data=st.data(), failed=st.booleans())
    def abort(self, data: st.DataObject, failed: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(s for s, v in self.state.items() if v == "w")))
        key = self._key(slot)
        self.reg.abort(slot, failed=failed)
        self._release(slot, bottom=failed)
        assert key not in self.reg

    @rule(key=st.sampled_from(EXACT_KEYS))
    def pin(self, key: SequenceHash) -> None:
        got = self.reg.pin(key)
        slot = self.slot_of.get(key)
        if slot is None or self.state[slot] != "r":
            assert got is None
            return
        assert got == slot
        self.lru.pop(key, None)
        self.pins[slot] = self.pins.get(slot, 0) + 1
        self.held.append(slot)

    @rule(run=st.lists(st.sampled_from(EXACT_KEYS), max_size=16), gather=st.booleans())
    def pin_run(self, run: list[SequenceHash], gather: bool) -> None:
        # Both lookups: numpy gathers (large registries) and one key at a time.
        saved = registry_mod._GATHER_MIN_SLOTS
        registry_mod._GATHER_MIN_SLOTS = 0 if gather else 1 << 62
        try:
            got = self.reg.pin_run(run)
        finally:
            registry_mod._GATHER_MIN_SLOTS = saved
        want: list[int] = []
        for key in run:  # pin, key by key, up to the first miss
            slot = self.slot_of.get(key)
            if slot is None or self.state[slot] != "r":
                break
            self.lru.pop(key, None)
            self.pins[slot] = self.pins.get(slot, 0) + 1
            self.held.append(slot)
            want.append(slot)
        assert got == want

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        slot = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        key = self._key(slot)
        self.reg.unpin(slot)
        assert self.reg.take_dropped() == self._model_unpin(slot, key)

    def _model_unpin(self, slot: int, key: SequenceHash) -> list[tuple[SequenceHash, int]]:
        """One pin of ``slot`` dropped in the model; the drop it makes (a doomed block)."""
        self.pins[slot] -= 1
        if self.pins[slot]:
            return []
        if slot in self.doomed:
            self._release(slot)
            return [(key, slot)]
        self.lru[key] = None
        self.lru.move_to_end(key)
        return []

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unpin_run(self, data: st.DataObject) -> None:
        # A match's release (the planner's): the batch unpin (compiled with the LRU and
        # no doomed block) is the per-slot unpin in the order given, a slot pinned twice
        # given twice: the same pins, drops and LRU order.
        at = data.draw(st.lists(st.integers(0, len(self.held) - 1), min_size=1, unique=True))
        slots = [self.held[i] for i in at]
        for i in sorted(at, reverse=True):
            del self.held[i]
        keys = [self._key(s) for s in slots]
        unpin_run(self.reg, slots)
        dropped = [d for s, k in zip(slots, keys) for d in self._model_unpin(s, k)]
        assert self.reg.take_dropped() == dropped

    @rule(key=st.sampled_from(EXACT_KEYS))
    def doom(self, key: SequenceHash) -> None:
        got = self.reg.doom(key)
        slot = self.slot_of.get(key)
        if slot is None or self.state[slot] != "r":
            assert got is False
            return
        if self.pins.get(slot):
            assert got is False
            self.doomed.add(slot)
        else:
            assert got is True
            del self.lru[key]
            self._release(slot)
            assert self.reg.take_dropped() == [(key, slot)]

    @rule(key=st.sampled_from(EXACT_KEYS))
    def remove(self, key: SequenceHash) -> None:
        slot = self.slot_of.get(key)
        expect = slot is not None and self.state[slot] == "r" and not self.pins.get(slot)
        assert self.reg.remove(key) == expect
        if expect:
            assert slot is not None
            del self.lru[key]
            self._release(slot)
            assert self.reg.take_dropped() == [(key, slot)]

    @rule()
    def evict(self) -> None:
        got = self.reg.evict()
        self.reg.take_evicted()
        slot = self.slot_of.get(self.lru.__iter__().__next__()) if self.lru else None
        key = self._model_evict()
        assert got == (None if key is None else (key, slot))

    @invariant()
    def every_slot_agrees_with_the_model(self) -> None:
        reg = self.reg
        assert reg.num_free == len(self.free) and reg.next_free() == (self.free[-1] if self.free else None)
        assert reg.num_evictable == len(self.lru)
        assert reg.num_pinned == sum(self.pins.values()) == len(self.held)
        for slot in range(CAPACITY):
            want = {"w": SlotState.WRITING, "r": SlotState.REGISTERED}.get(self.state.get(slot, ""),
                                                                           SlotState.FREE)
            assert reg.state_at(slot) is want
            assert reg.pins_at(slot) == self.pins.get(slot, 0)
        for key in EXACT_KEYS:
            slot = self.slot_of.get(key)
            assert (key in reg) == (slot is not None)
            assert reg.lookup(key) == (slot if slot is not None and self.state[slot] == "r" else None)
            if slot is not None:
                assert reg.key_at(slot) == key
        assert sorted(reg.registered()) == sorted((k, s) for k, s in self.slot_of.items()
                                                  if self.state[s] == "r")


TestExactRegistryMachine = ExactRegistryMachine.TestCase
TestExactRegistryMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


INDEX_CAP = 24  # a 64-entry index
INDEX_POOL = crowded_keys(INDEX_CAP, [0, 4, 28, 56, 60], 9)  # bucket homes: multiples of 4
INDEX_ABSENT = INDEX_POOL[8::9]  # one key per home, never added
INDEX_ADDED = [k for k in INDEX_POOL if k not in INDEX_ABSENT]


class SlotKeysMachine(RuleBasedStateMachine):
    """The key index against a dict, with keys crowded onto a few homes so that
    clusters form, wrap around the end of the index and are shifted back on removal."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = SlotKeys(INDEX_CAP)
        self.model: dict[bytes, int] = {}
        self.free = list(range(INDEX_CAP))

    @precondition(lambda self: self.free)
    @rule(k=st.sampled_from(INDEX_ADDED))
    def add(self, k: bytes) -> None:
        kb = self.keys.canon_to_add(k)
        if k in self.model:
            assert self.keys.find_canon(kb) == self.model[k]
            return
        assert self.keys.find_canon(kb) == -1
        slot = self.free.pop()
        self.keys.add(kb, slot)
        self.model[k] = slot

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(self.model)))
        slot = self.model.pop(k)
        self.keys.remove(slot)
        self.free.append(slot)

    @invariant()
    def every_key_is_found_in_its_slot_and_no_other_is(self) -> None:
        assert len(self.keys) == len(self.model)
        for k, slot in self.model.items():
            assert self.keys.find(k) == slot and self.keys.key_at(slot) == k
        for k in INDEX_ABSENT:
            assert self.keys.find(k) == -1

    @invariant()
    def a_run_of_keys_is_found_as_key_by_key_up_to_the_first_absent(self) -> None:
        run = sorted(self.model) + INDEX_ABSENT[:1] + sorted(self.model)
        want = [self.model[k] for k in sorted(self.model)]
        assert self.keys.find_prefix(run).tolist() == want
        assert self.keys.find_prefix(sorted(self.model)[::-1]).tolist() == want[::-1]

    @invariant()
    def no_key_lies_beyond_an_empty_entry_from_its_home(self) -> None:
        # Otherwise a lookup of that key would stop at the empty entry and miss it.
        index, mask = self.keys._index_np, self.keys._mask
        for k, slot in self.model.items():
            i = self.keys.home_of(k)
            while index[i] < 0 or index[i] & self.keys.slot_mask != slot:
                assert index[i] >= 0, f"key {k.hex()} lies beyond an empty entry"
                i = (i + 1) & mask


TestSlotKeysMachine = SlotKeysMachine.TestCase
TestSlotKeysMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_integer_keys_come_back_as_the_same_integers() -> None:
    reg = new_registry(4)
    for k in (-(2**127), -1, 0, 2**127 - 1):
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    assert sorted(k for k, _ in reg.registered()) == [-(2**127), -1, 0, 2**127 - 1]  # type: ignore[type-var]
    assert reg.evict() == (-(2**127), 0)
    assert reg.lookup((-1).to_bytes(16, "little", signed=True)) is None  # type: ignore[arg-type]


def test_a_key_of_the_other_kind_is_refused_with_its_value_and_never_found() -> None:
    reg = new_registry(4)
    reg.commit(reg.allocate(KEYS[0]))  # type: ignore[arg-type]
    code = int.from_bytes(KEYS[0], "little")
    assert code not in reg and reg.lookup(code) is None  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=f"block key {code}: each key of this registry is a 16-byte"):
        reg.allocate(code)  # type: ignore[arg-type]
    assert reg.num_used == 1, "a refused key takes no slot"


def test_a_key_of_another_length_is_refused_and_never_matches_a_16_byte_key() -> None:
    reg = new_registry(4)
    long = SequenceHash(b"\x01" * 15 + b"\x00")
    reg.commit(reg.allocate(long))  # type: ignore[arg-type]
    short = SequenceHash(b"\x01" * 15)  # the same number, one byte shorter
    assert short not in reg and reg.pin(short) is None
    with pytest.raises(TypeError, match="16-byte SequenceHash"):
        reg.allocate(short)


def test_a_policy_serving_one_registry_is_refused_by_a_second() -> None:
    policy = LRUPolicy(2)
    reg = BlockRegistry("a", 2, policy)
    reg.commit(reg.allocate(KEYS[0]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give each tier a policy of its own"):
        BlockRegistry("b", 2, policy)


def test_a_failed_slot_goes_below_the_never_used_ones() -> None:
    reg = new_registry(3)
    slot = reg.allocate(KEYS[0])
    assert slot == 0
    reg.abort(slot, failed=True)
    assert [reg.allocate(k) for k in KEYS[1:4]] == [1, 2, 0]


def test_restore_leaves_the_lowest_free_slot_on_top() -> None:
    reg = new_registry(4)
    reg.restore([(0, KEYS[0]), (2, KEYS[1])])
    assert (reg.allocate(KEYS[2]), reg.allocate(KEYS[3])) == (1, 3)


def test_arrays_cost_under_64_bytes_per_slot_with_the_lru() -> None:
    reg = BlockRegistry("t", 100_000, LRUPolicy(100_000))
    assert reg.nbytes / reg.capacity <= 64


def test_a_free_slots_stale_key_after_the_last_pin_is_not_taken_for_the_block() -> None:
    reg = new_registry(4)
    for k in KEYS[:3]:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    assert reg.remove(KEYS[1]) and reg.remove(KEYS[2])  # slot 1 then slot 2 freed
    moved = reg.allocate(KEYS[1])  # takes slot 2, the top of the free stack
    assert moved == 2
    reg.commit(moved)
    reg.unpin(reg.pin(KEYS[0]))  # type: ignore[arg-type]  # slot 0: slot 1 is tried next
    assert reg.pin(KEYS[1]) == 2, "slot 1 still holds KEYS[1]'s bytes, but is free"


def test_a_block_in_the_slot_after_the_last_pin_is_found_there() -> None:
    reg = new_registry(4)
    for k in KEYS[:3]:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    assert [reg.pin(k) for k in KEYS[:3]] == [0, 1, 2]
    assert reg.pin(KEYS[3]) is None and reg.pin(KEYS[0]) == 0


def test_a_capacity_past_int32_slot_numbers_is_refused_naming_the_tier_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"tier 'big': capacity 2147483647 blocks exceeds .* "
                                         r"use larger blocks"):
        BlockRegistry("big", 2**31 - 1, LRUPolicy(8))


def test_a_forked_process_changing_its_copy_leaves_the_parents_keys_alone() -> None:
    import os

    reg = new_registry(2)
    reg.commit(reg.allocate(KEYS[0]))  # type: ignore[arg-type]
    pid = os.fork()
    if pid == 0:  # the child evicts the block and stores another in its slot
        reg.evict()
        reg.commit(reg.allocate(KEYS[1]))  # type: ignore[arg-type]
        os._exit(0 if reg.key_at(0) == KEYS[1] else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert reg.key_at(0) == KEYS[0] and reg.pin(KEYS[0]) == 0


def test_a_batch_commit_of_a_slot_not_being_written_asserts_naming_it() -> None:
    reg = new_registry()
    a, b = reg.allocate(KEYS[0]), reg.allocate(KEYS[1])
    assert a is not None and b is not None
    with pytest.raises(AssertionError, match=f"commit of slot {b} in state REGISTERED"):
        reg.commit_run([a, b, b])  # the repeat: the first two are committed
    assert reg.lookup(KEYS[0]) == a and reg.lookup(KEYS[1]) == b
    with pytest.raises(AssertionError, match=f"commit of slot {a} in state REGISTERED"):
        reg.commit_run([a])
    assert reg.num_evictable == 2


def test_a_batch_commit_uses_the_compiled_call_where_it_is_built() -> None:
    from kvbm import _registry_native
    reg = new_registry()
    assert (reg._commit_run is not None) == (_registry_native.load() is not None)

"""The block registry, checked against a plain model by a hypothesis state machine."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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
    def no_hash_in_two_slots(self) -> None:
        slots = [self.reg._slot_of[k] for k in self.reg._slot_of]
        assert len(slots) == len(set(slots))

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

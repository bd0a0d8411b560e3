"""A prefix looked up at once (``BlockRegistry.pin_run``, ``SlotKeys.find_prefix``,
``Planner.match``) gives exactly what pinning it key by key gives."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from kvbm import _registry_native
from kvbm import registry as registry_mod
from kvbm.chain import TierState
from kvbm.config import TierConfig
from kvbm.flatmap import SlotKeys
from kvbm.hashing import SequenceHash
from kvbm.planner import Planner
from kvbm.policy import AdmitAll, LRUPolicy
from kvbm.registry import BlockRegistry, SlotState


def key(i: int) -> SequenceHash:
    return SequenceHash(i.to_bytes(16, "little"))


def new_registry(capacity: int) -> BlockRegistry:
    return BlockRegistry("t", capacity, LRUPolicy(capacity))


def window_of(table: SlotKeys, k: bytes) -> list[int]:
    """The index positions ``find_prefix`` reads for ``k``."""
    home, mask = table.home_of(k), table.probe[2]
    return [(home + j) & mask for j in range(len(table._steps))]


def position_of(table: SlotKeys, slot: int) -> int:
    index = table._index_np
    return int(((index >= 0) & (index & table.slot_mask == slot)).nonzero()[0][0])


@pytest.fixture(autouse=True, scope="module", params=["native", "gather", "per-key"])
def lookup(request: pytest.FixtureRequest) -> object:
    """Every test here runs with each lookup of a run: the compiled one
    (``kvbm._registry_native``, when this machine can build it), and without it numpy
    gathers (what a registry of millions of slots takes) and one key at a time (a
    smaller one)."""
    if request.param == "native" and _registry_native.load() is None:
        pytest.skip("no C compiler or Python headers: the compiled lookup cannot be built")
    saved = registry_mod._GATHER_MIN_SLOTS, _registry_native.enabled
    registry_mod._GATHER_MIN_SLOTS = 0 if request.param == "gather" else 1 << 62
    _registry_native.enabled = request.param == "native"
    yield request.param
    registry_mod._GATHER_MIN_SLOTS, _registry_native.enabled = saved


def test_a_key_one_byte_off_a_stored_key_in_its_window_is_a_miss_at_each_byte() -> None:
    # Each impostor differs from a stored key in one byte and its lookup reads that
    # key's index entry: only the compare of all 16 bytes tells them apart.
    reg = new_registry(8)
    stored = [key(i) for i in range(8)]
    for k in stored:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    table = reg._keys
    victim = stored[7]
    at = position_of(table, 7)
    for byte in range(16):
        impostors = [SequenceHash(victim[:byte] + bytes([v]) + victim[byte + 1:])
                     for v in range(256) if v != victim[byte]]
        impostors = [k for k in impostors if k not in stored]
        near = [k for k in impostors if at in window_of(table, k)]
        assert near, f"no impostor at byte {byte} reads slot 7's entry"  # the test's premise
        for imp in near[:4]:
            assert table.find_run([imp]) == []
            assert reg.pin_run(stored[:7] + [imp]) == list(range(7))
            for s in range(7):
                reg.unpin(s)
    assert reg.pin_run(stored) == list(range(8))  # and the key itself is a hit


def test_an_empty_entry_never_reads_as_the_last_slots_stale_key() -> None:
    # An empty index entry (-1) gathers the last slot's key; a removed key whose bytes
    # are still there must not be found through it.
    reg = new_registry(8)
    table = reg._keys
    stored = [key(i) for i in range(7)]
    for k in stored:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    index = table._index_np
    last = next(k for k in (key(i) for i in range(100, 10_000))
                if any(index[p] < 0 for p in window_of(table, k)))
    assert reg.allocate(last) == 7
    reg.commit(7)
    assert reg.pin_run(stored + [last]) == list(range(8))  # found once, in its slot
    for s in range(8):
        reg.unpin(s)
    assert reg.remove(last) and reg.key_at(7) is None
    assert table.key_at(7) == last  # its bytes stay in the slot
    assert table.find_run([last]) == []
    assert reg.pin_run(stored + [last]) == list(range(7))
    assert reg.pin_run([last] + stored) == []


def test_a_block_still_being_written_ends_the_run() -> None:
    reg = new_registry(16)
    keys = [key(i) for i in range(12)]
    slots = [reg.allocate(k) for k in keys]
    for i, s in enumerate(slots):
        if i != 5:
            reg.commit(s)  # type: ignore[arg-type]
    assert reg.pin_run(keys) == slots[:5]
    assert [reg.pins_at(s) for s in slots] == [1] * 5 + [0] * 7  # type: ignore[arg-type]
    assert reg.num_evictable == 11 - 5 and reg.state_at(slots[5]) is SlotState.WRITING  # type: ignore[arg-type]


def test_a_key_further_from_its_home_than_the_window_is_found() -> None:
    # Ten keys with one home: the last ones lie past the entries read at once (8 here).
    table = SlotKeys(16)
    crowd: list[bytes] = []
    i = 0
    while len(crowd) < 10:
        if table.home_of(key(i)) == 24:  # the last bucket: wraps round the 32-entry index
            crowd.append(key(i))
        i += 1
    for s, k in enumerate(crowd):
        table.add(k, s)
    assert table.find_run(crowd) == list(range(10))
    assert table.find_run(crowd[::-1]) == list(range(9, -1, -1))
    table.remove(3)
    assert table.find_run(crowd) == [0, 1, 2]


def test_a_free_slot_in_a_run_of_consecutive_slots_is_passed_over_for_the_index() -> None:
    # Keys saved together in slots 0-9; key 4 then moved to slot 10, leaving its bytes
    # in free slot 4. The run is read from consecutive slots up to slot 4 only.
    reg = new_registry(16)
    keys = [key(i) for i in range(10)]
    for k in keys:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    move(reg, keys[4])
    assert reg.state_at(4) is SlotState.FREE and reg._keys.key_at(4) == keys[4]
    assert reg.pin_run(keys) == [0, 1, 2, 3, 10, 5, 6, 7, 8, 9]


def move(reg: BlockRegistry, k: SequenceHash) -> None:
    """Store registered key ``k`` again in another slot; its old slot stays free with
    ``k``'s bytes (a failed write sends it below the other free slots)."""
    slot = reg.lookup(k)
    assert slot is not None and reg.remove(k)
    assert reg.allocate(k) == slot
    reg.abort(slot, failed=True)
    again = reg.allocate(k)
    assert again is not None and again != slot, "no other free slot to move to"
    reg.commit(again)


def build(capacity: int, states: list[int]) -> tuple[BlockRegistry, list[SequenceHash]]:
    """A registry whose key i is absent (0), being written (1), registered (2),
    registered and pinned (3) or registered, then moved to a later slot (4); the LRU
    order is the order of the keys (the moved ones last)."""
    reg = new_registry(capacity + states.count(4))
    keys = [key(1000 + i) for i in range(len(states))]
    for k, s in zip(keys, states):
        if s:
            slot = reg.allocate(k)
            assert slot is not None
            if s >= 2:
                reg.commit(slot, pinned=s == 3)
    for k, s in zip(keys, states):
        if s == 4:
            move(reg, k)
    return reg, keys


@settings(max_examples=300, deadline=None)
@given(data=st.data(), states=st.lists(st.integers(0, 4), min_size=1, max_size=40))
def test_pin_run_pins_what_pinning_key_by_key_pins(data: st.DataObject, states: list[int]) -> None:
    capacity = data.draw(st.integers(len(states), 64), label="capacity")
    last = len(states) - 1
    consecutive = st.tuples(st.integers(0, last), st.integers(0, last)).map(
        lambda ab: list(range(ab[0], ab[1] + 1)))  # blocks saved together, matched in order
    run = data.draw(st.one_of(consecutive, st.lists(st.integers(0, last), max_size=40)),
                    label="run")
    a, keys = build(capacity, states)
    b, _ = build(capacity, states)
    got = a.pin_run([keys[i] for i in run])
    want: list[int] = []
    for i in run:
        slot = b.pin(keys[i])
        if slot is None:
            break
        want.append(slot)
    assert got == want
    assert [a.pins_at(s) for s in range(a.capacity)] == [b.pins_at(s) for s in range(b.capacity)]
    assert a.num_evictable == b.num_evictable
    victims = [a.evict() for _ in range(a.num_evictable)]
    assert victims == [b.evict() for _ in range(b.num_evictable)]


def planner(tiers: list[BlockRegistry]) -> Planner:
    class _Tier:  # what the planner asks of a tier's class on the match path
        shared = False
        medium = "host"

    return Planner([TierState(f"t{i}", i, _Tier, TierConfig(type="host", num_blocks=r.capacity),  # type: ignore[arg-type]
                              r, AdmitAll()) for i, r in enumerate(tiers)], page_size=16)


@settings(max_examples=200, deadline=None)
@given(where=st.lists(st.sampled_from(["top", "below", "both", "none"]), min_size=1, max_size=24))
def test_a_match_takes_each_block_from_the_first_tier_holding_it_up_to_the_first_miss(
        where: list[str]) -> None:
    keys = [key(i) for i in range(len(where))]
    top, below = new_registry(32), new_registry(32)
    for k, w in zip(keys, where):
        for reg, here in ((top, w in ("top", "both")), (below, w in ("below", "both"))):
            if here:
                reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    p = planner([top, below])
    m = p.match(keys)
    want_tiers: list[str] = []
    lookups = [0, 0]
    for w in where:
        lookups[0] += 1
        if w in ("top", "both"):
            want_tiers.append("t0")
            continue
        lookups[1] += 1
        if w == "below":
            want_tiers.append("t1")
            continue
        break
    assert m.tiers == want_tiers and m.hashes == keys[:len(want_tiers)]
    assert [t.lookups for t in p.tiers] == lookups
    assert [t.hits for t in p.tiers] == [want_tiers.count("t0"), want_tiers.count("t1")]
    assert top.num_pinned == want_tiers.count("t0") and below.num_pinned == want_tiers.count("t1")
    m.release()
    assert top.num_pinned == below.num_pinned == 0


def test_writing_and_removing_a_key_leaves_every_slots_extra_bytes_alone() -> None:
    # The registry keeps each slot's pins and state in the record after its key: a key
    # written one byte too long, or a record stride off by one, would change them.
    table = SlotKeys(4, extra=8)
    pins, state = table.field(0, np.int32), table.field(4, np.int8)
    pins[:] = [-1, 2**31 - 1, 7, -(2**31)]
    state[:] = [-1, 1, 2, 127]
    for s in range(4):
        table.add(key(s), s)
    table.remove(1)
    table.add(key(9), 1)
    assert pins.tolist() == [-1, 2**31 - 1, 7, -(2**31)]
    assert state.tolist() == [-1, 1, 2, 127]
    assert [table.key_at(s) for s in range(4)] == [key(0), key(9), key(2), key(3)]
    assert table.find_run([key(0), key(9), key(2), key(3)]) == [0, 1, 2, 3]


@pytest.mark.parametrize("tag_bits", [0, 1])
def test_a_key_whose_tag_matches_a_stored_entry_in_its_window_is_still_compared_whole(
        tag_bits: int) -> None:
    # The index entry's tag only rules entries out. With a 1-bit tag (or none) half
    # (or all) of the keys whose window holds a stored entry carry that entry's tag:
    # each must still be a miss, by the compare of all 16 bytes.
    table = SlotKeys(8, tag_bits=tag_bits)
    stored = [key(i) for i in range(8)]
    for s, k in enumerate(stored):
        table.add(k, s)
    index = table._index_np
    colliding = []
    for i in range(100, 5000):
        k = key(i)
        for p in window_of(table, k):
            e = int(index[p])
            if e >= 0 and e >> table._tag_shift == table.tag_of(k):
                colliding.append(k)
                break
    assert len(colliding) > 100  # the test's premise: many tag collisions
    for k in colliding:
        assert table.find_run([k]) == []
        assert table.find_run([*stored[:3], k, stored[3]]) == [0, 1, 2]
        assert table.find_canon(k) == -1
    assert table.find_run(stored) == list(range(8))


def test_a_stored_key_is_found_whatever_the_tags_of_the_entries_before_it() -> None:
    # A cluster of keys with one home: each lookup passes entries of other keys (with
    # their tags) before its own, in the window and beyond it.
    for tag_bits in (0, 1, None):
        table = SlotKeys(16, tag_bits=tag_bits)
        crowd = [k for k in (key(i) for i in range(20_000)) if table.home_of(k) == 8][:12]
        for s, k in enumerate(crowd):
            table.add(k, s)
        assert table.find_run(crowd) == list(range(12))
        assert [table.find_canon(k) for k in crowd] == list(range(12))
        for s in (0, 5, 11):
            table.remove(s)
        left = [k for s, k in enumerate(crowd) if s not in (0, 5, 11)]
        assert table.find_run(left) == [s for s in range(12) if s not in (0, 5, 11)]


class _OwnLinksLRU(LRUPolicy):
    """An LRU whose ``use_slots`` takes no ``links``: it keeps its own arrays."""

    def use_slots(self, capacity: int) -> bool:  # type: ignore[override]
        return super().use_slots(capacity)


def test_an_lru_in_the_records_and_one_in_its_own_arrays_pin_and_evict_alike() -> None:
    # The core LRU keeps its links in the registry's slot records (next to each key,
    # pin count and state); a policy that does not take them keeps its own. Same
    # matches, same pins, same victims, and no record field overwrites another.
    regs = [BlockRegistry("t", 40, LRUPolicy(40)), BlockRegistry("t", 40, _OwnLinksLRU(40))]
    assert regs[0]._links_in_records and not regs[1]._links_in_records
    keys = [key(i) for i in range(60)]
    for reg in regs:
        for k in keys[:40]:
            reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    runs = [keys[5:20], keys[30:38], keys[5:12], keys[0:3]]
    got = [[reg.pin_run(r) for r in runs] for reg in regs]
    assert got[0] == got[1] and [len(s) for s in got[0]] == [15, 8, 7, 3]
    for reg in regs:
        for slot in got[0][1] + got[0][2]:
            reg.unpin(slot)
    victims = [[reg.evict() for _ in range(20)] for reg in regs]
    assert victims[0] == victims[1]
    assert victims[0][:5] == [(keys[i], i) for i in (3, 4, 20, 21, 22)]
    for reg in regs:
        assert [reg.key_at(s) for s in range(40)] == [
            None if (k, s) in victims[0] else k for s, k in enumerate(keys[:40])]
        assert [reg.pins_at(s) for s in range(40)] == [
            1 if s in got[0][0] + got[0][3] else 0 for s in range(40)]


def test_a_pin_after_the_last_slot_with_an_all_zero_key_takes_the_index() -> None:
    # After a pin of the last slot, the next pin first tries the slot after it: past
    # the end, a record that holds no key (zero bytes). An all-zero key is a miss
    # there, not an error and not a hit.
    reg = new_registry(2)
    zero, other = SequenceHash(bytes(16)), key(5)
    reg.commit(reg.allocate(other))  # type: ignore[arg-type]
    reg.commit(reg.allocate(zero))  # type: ignore[arg-type]
    assert reg.pin(other) == 0 and reg.pin(zero) == 1
    assert reg.pin(zero) == 1  # tried after slot 1 first
    assert reg.remove(other) is False and reg.evict() is None
    reg2 = new_registry(2)
    reg2.commit(reg2.allocate(key(7)))  # type: ignore[arg-type]
    reg2.commit(reg2.allocate(key(8)))  # type: ignore[arg-type]
    assert reg2.pin(key(8)) == 1
    assert reg2.pin(zero) is None


def test_a_block_pinned_by_a_run_and_released_is_evicted_after_every_block_not_matched() -> None:
    # The compiled pin leaves a block in its place in the LRU list; its release must
    # still make it the most recent, and the count of evictable blocks must follow.
    reg = new_registry(12)
    keys = [key(i) for i in range(12)]
    for k in keys:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    got = reg.pin_run(keys[2:6])
    assert got == [2, 3, 4, 5] and reg.num_evictable == 8
    for s in (4, 2, 5, 3):
        reg.unpin(s)
    assert reg.num_evictable == 12
    victims = [reg.evict() for _ in range(12)]
    assert [s for _, s in victims] == [0, 1, 6, 7, 8, 9, 10, 11, 4, 2, 5, 3]
    assert reg.num_evictable == 0 and reg.evict() is None


def test_a_pinned_block_at_the_head_of_the_lru_is_passed_over_by_eviction() -> None:
    # The oldest blocks are matched and held: eviction takes the next ones, and once
    # released the held ones come last, in the order they were released.
    reg = new_registry(6)
    keys = [key(i) for i in range(6)]
    for k in keys:
        reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    assert reg.pin_run(keys[:2]) == [0, 1] and reg.pin_run(keys[:1]) == [0]
    assert [reg.evict() for _ in range(2)] == [(keys[2], 2), (keys[3], 3)]
    assert reg.num_evictable == 2
    reg.unpin(1)
    reg.unpin(0)
    assert reg.num_evictable == 3  # slot 0 still holds one pin
    reg.unpin(0)
    assert [s for _, s in (reg.evict() for _ in range(4))] == [4, 5, 1, 0]
    assert reg.evict() is None

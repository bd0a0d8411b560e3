"""``Planner.plan_save``: every planned write carries its own block's source index, owner and
priority, whether the whole batch got slots (the planner's pass-free path) or only part of it
(held blocks, a full tier, overflow into the tier below)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from kvbm.chain import TierState
from kvbm.config import TierConfig
from kvbm.hashing import SequenceHash
from kvbm.planner import Planner
from kvbm.policy import AdmitAll, LRUPolicy
from kvbm.registry import BlockRegistry, SlotState


def key(i: int) -> SequenceHash:
    return SequenceHash(i.to_bytes(16, "little"))


class _Tier:
    shared = False
    medium = "host"


def planner(caps: list[int], write_through: bool) -> Planner:
    regs = [BlockRegistry(f"t{i}", c, LRUPolicy(c)) for i, c in enumerate(caps)]
    return Planner([TierState(f"t{i}", i, _Tier, TierConfig(type="host", num_blocks=r.capacity),  # type: ignore[arg-type]
                              r, AdmitAll()) for i, r in enumerate(regs)],
                   page_size=16, write_through=write_through)


@settings(max_examples=300, deadline=None)
@given(caps=st.lists(st.integers(1, 8), min_size=1, max_size=2), write_through=st.booleans(),
       held=st.sets(st.integers(0, 11), max_size=4), pinned=st.integers(0, 8),
       batch=st.lists(st.integers(0, 11), min_size=1, max_size=10, unique=True),
       data=st.data())
def test_each_planned_write_carries_its_own_blocks_source_owner_and_priority(
        caps: list[int], write_through: bool, held: set[int], pinned: int, batch: list[int],
        data: st.DataObject) -> None:
    p = planner(caps, write_through)
    top = p.tiers[0].registry
    for k in sorted(held):  # blocks the first tier holds already
        s = top.allocate(key(k))
        if s is not None:
            top.commit(s)
    for k in range(100, 100 + pinned):  # blocks pinned in place: the first tier fills up
        s = top.allocate(key(k))
        if s is not None:
            top.commit(s, pinned=True)
    n = len(batch)
    hashes = [key(k) for k in batch]
    src = data.draw(st.permutations(range(50, 50 + n)))
    owners = [f"req{k}" for k in batch]
    prios = data.draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    res = p.plan_save(hashes, src, prios, owners)
    where = {bytes(h): j for j, h in enumerate(hashes)}
    saved = 0
    for op in res.plan.saves:
        pend = p._pending[op.op_id]
        reg = p.tiers[op.tier].registry
        assert len(op.slots) == len(op.keys) == len(op.src) == len(op.owners) == len(pend.prios)
        assert pend.keys == op.keys and pend.slots == op.slots
        for i, (s, k) in enumerate(zip(op.slots, op.keys)):
            j = where[k]
            assert type(k) is bytes
            assert (op.src[i], op.owners[i], pend.prios[i]) == (src[j], owners[j], prios[j])
            assert reg.state_at(s) == SlotState.WRITING and reg.key_at(s) == k
        saved += len(op.slots)
    assert saved + res.present + res.rejected + res.not_saved == n

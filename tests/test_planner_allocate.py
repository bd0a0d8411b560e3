"""The planner's batch allocation (``kvbm._allocate_native.allocate_run``, one compiled call a
batch) does exactly what ``BlockRegistry.allocate`` called key by key does: the same
slots, evictions (pinned blocks passed over), free stack, counts and index."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from kvbm import _allocate_native as alloc_mod
from kvbm._allocate_native import allocate_run
from kvbm.hashing import SequenceHash
from kvbm.policy import LRUPolicy
from kvbm.registry import BlockRegistry, SlotState

if alloc_mod._alloc_fn() is None:  # pragma: no cover - no compiler or Python headers
    pytest.skip("the batch allocation is not built here", allow_module_level=True)


def key(i: int) -> SequenceHash:
    return SequenceHash(i.to_bytes(16, "little"))


def registry(capacity: int) -> BlockRegistry:
    reg = BlockRegistry("t", capacity, LRUPolicy(capacity))
    assert reg._native is not None and reg._lru is not None
    return reg


def snapshot(reg: BlockRegistry, keys: range) -> tuple[object, ...]:
    return (reg._nfree, reg._bottom, len(reg.policy), reg.evictions, reg._ring_np.tolist(),
            reg._state_np.tolist(), reg._pins_np.tolist(),
            [reg._keys.find(key(k)) for k in keys], reg._keys.indexed_slots().tolist(),
            reg.take_dropped())


# One operation: ("alloc", keys) a batch, ("commit", i) / ("abort", i) the i-th slot being
# written, ("pin", k) / ("pin_run", k) / ("unpin", i) a registered key / the i-th pinned
# slot.
OPS = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.lists(st.integers(0, 15), min_size=2, max_size=6)),
    st.tuples(st.sampled_from(["commit", "abort", "unpin"]), st.integers(0, 50)),
    st.tuples(st.sampled_from(["pin", "pin_run"]), st.integers(0, 15)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 6), ops=OPS)
def test_a_batch_allocates_as_allocate_key_by_key(capacity: int, ops: list) -> None:
    a, b = registry(capacity), registry(capacity)  # a: batch, b: one call a key
    writing: list[int] = []
    pinned: list[int] = []
    for op, arg in ops:
        if op == "alloc":
            keys = [key(k) for k in arg]
            got = allocate_run(a, keys)
            assert got == [b.allocate(k) for k in keys], arg
            writing.extend(s for s in got if s is not None)
        elif op in ("commit", "abort") and writing:
            s = writing.pop(arg % len(writing))
            for r in (a, b):
                r.commit(s) if op == "commit" else r.abort(s)
        elif op == "pin":
            sa, sb = a.pin(key(arg)), b.pin(key(arg))
            assert sa == sb
            if sa is not None:
                pinned.append(sa)
        elif op == "pin_run":  # the compiled run: pinned where it sits in the LRU list
            ra, rb = a.pin_run([key(arg)]), b.pin_run([key(arg)])
            assert ra == rb
            sa = ra[0] if ra else None
            if sa is not None:
                pinned.append(sa)
        elif op == "unpin" and pinned:
            s = pinned.pop(arg % len(pinned))
            a.unpin(s)
            b.unpin(s)
        assert snapshot(a, range(16)) == snapshot(b, range(16)), (op, arg)


def test_a_full_tier_evicts_the_least_recent_blocks_passing_over_pinned_ones() -> None:
    reg = registry(4)
    slots = allocate_run(reg, [key(k) for k in range(4)])
    for s in slots:
        reg.commit(s)  # type: ignore[arg-type]
    assert reg.pin_run([key(0)]) == [slots[0]]  # pinned where it sits, at the LRU's head
    got = allocate_run(reg, [key(10), key(11), key(3)])
    assert got[2] is None  # held already
    assert sorted(s for _, s in reg.take_dropped()) == sorted([slots[1], slots[2]])
    assert reg.lookup(key(0)) == slots[0] and reg.pins_at(slots[0]) == 1
    assert reg.state_at(got[0]) is SlotState.WRITING  # type: ignore[arg-type]
    assert reg._keys.find(key(1)) == -1 and reg._keys.find(key(10)) == got[0]


def test_keys_the_call_does_not_take_go_through_allocate() -> None:
    """An int key in a table of bytes keys: the compiled call stops before it, and
    ``allocate`` refuses it as it would alone; the keys before it are allocated."""
    reg, ref = registry(8), registry(8)
    for r in (reg, ref):
        r.allocate(key(0))  # the table holds bytes keys from now on
    keys = [key(1), key(2), 3, key(4)]
    with pytest.raises(TypeError):
        ref.allocate(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        allocate_run(reg, keys)  # type: ignore[arg-type]
    assert reg._keys.find(key(2)) >= 0 and reg._keys.find(key(4)) == -1

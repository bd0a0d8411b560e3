"""The compiled lookup of a run (``kvbm._registry_native``) answers what the Python
lookup answers, and without it the registry still works.

The behaviours of a run's lookup and pins (misses by one byte, tags that collide,
blocks still being written, keys past their bucket) are in ``test_registry_run.py``,
which runs each test on both paths."""

from __future__ import annotations

import ctypes

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from kvbm import _cc, _registry_native
from kvbm.flatmap import SlotKeys
from kvbm.policy import LRUPolicy
from kvbm.registry import BlockRegistry

needs_native = pytest.mark.skipif(_registry_native.load() is None,
                                  reason="no C compiler or Python headers")


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def table_of(capacity: int, tag_bits: int | None, stored: list[int], removed: list[int],
             native: bool) -> SlotKeys:
    saved = _registry_native.enabled
    _registry_native.enabled = native
    try:
        table = SlotKeys(capacity, tag_bits=tag_bits)
    finally:
        _registry_native.enabled = saved
    assert table.native == native
    for s, k in enumerate(stored):
        table.add(key(k), s)
    for s in removed:
        table.remove(s)
    return table


@st.composite
def tables(draw: st.DrawFn) -> tuple[int, int | None, list[int], list[int], list[bytes]]:
    """A table of random keys (few distinct values, so that runs mix hits and misses),
    some removed again, a tag of 0, 1 or all free bits, and a run of keys to look up."""
    capacity = draw(st.integers(1, 80), label="capacity")
    stored = draw(st.lists(st.integers(0, 200), unique=True, max_size=capacity), label="stored")
    removed = draw(st.lists(st.sampled_from(range(len(stored))), unique=True)
                   if stored else st.just([]), label="removed")
    tag_bits = draw(st.sampled_from([0, 1, None]), label="tag_bits")
    run = draw(st.lists(st.one_of(st.sampled_from(stored) if stored else st.nothing(),
                                  st.integers(0, 200)), max_size=150), label="run")
    return capacity, tag_bits, stored, removed, [key(k) for k in run]


@needs_native
@settings(max_examples=400, deadline=None)
@given(case=tables())
def test_the_compiled_lookup_finds_what_the_python_lookup_finds(
        case: tuple[int, int | None, list[int], list[int], list[bytes]]) -> None:
    capacity, tag_bits, stored, removed, run = case
    fast = table_of(capacity, tag_bits, stored, removed, native=True)
    slow = table_of(capacity, tag_bits, stored, removed, native=False)
    want: list[int] = []
    for k in run:  # key by key: the probe of SlotKeys.find_canon
        s = slow.find_canon(k)
        if s < 0:
            break
        want.append(s)
    assert slow.find_run(run) == want  # numpy's gathers
    assert fast.find_run(run) == want


@needs_native
def test_a_run_longer_than_one_chunk_of_the_compiled_lookup_is_found_whole() -> None:
    # The compiled lookup takes 64 keys a round: the run goes on into the next round,
    # and a miss in a later round ends it there.
    table = table_of(1000, None, list(range(1000)), [], native=True)
    run = [key(k) for k in range(999, 699, -1)]
    assert table.find_run(run) == list(range(999, 699, -1))
    assert table.find_run(run[:130] + [key(5000)] + run[130:]) == list(range(999, 869, -1))


def test_without_the_compiled_lookup_a_registry_matches_as_with_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # No compiler on the machine: nothing is built, and the registry takes the numpy and
    # Python paths with the same answers.
    monkeypatch.setattr(_cc, "compiler", lambda: None)
    monkeypatch.setattr(_registry_native, "_lib", _cc.Once(_registry_native._build))
    assert _registry_native.load() is None
    regs = [BlockRegistry("t", 300, LRUPolicy(300))]
    monkeypatch.undo()
    if _registry_native.load() is not None:
        regs.append(BlockRegistry("t", 300, LRUPolicy(300)))
    assert regs[0]._native is None and all(r._native is not None for r in regs[1:])
    keys = [key(k) for k in range(300)]
    for reg in regs:
        for k in keys[::2] + keys[1::2]:  # a prefix's blocks far apart
            reg.commit(reg.allocate(k))  # type: ignore[arg-type]
    runs = [keys[:100], keys[50:90] + [key(999)] + keys[:3], keys[:10], [key(999)]]
    got = [[reg.pin_run(r) for r in runs] for reg in regs]
    assert [len(s) for s in got[0]] == [100, 40, 10, 0]
    assert all(g == got[0] for g in got)
    for reg in regs:
        for slot in got[0][1]:
            reg.unpin(slot)
    victims = [[reg.evict() for _ in range(reg.num_evictable)] for reg in regs]
    assert len(victims[0]) == 200 and all(v == victims[0] for v in victims)


@needs_native
def test_the_equivalence_check_catches_a_compiled_lookup_that_trusts_the_tag() -> None:
    # Negative control for the test above: the same C with the whole-key compare left
    # out (a tag match taken for a hit) answers otherwise on a table of 1-bit tags.
    broken = _registry_native.SOURCE.replace(
        "if (same16(recs + (int64_t)c * stride, kb[found]))", "if (1)")
    assert broken != _registry_native.SOURCE
    lib = _cc.build(broken, "a broken lookup (test)", "nothing", capi=True)
    assert lib is not None
    fn = lib.kvbm_find_run
    fn.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.py_object
    table = table_of(64, 1, list(range(64)), [], native=True)
    params, unlinked = table.native_params(), np.zeros(1, np.int64)
    absent = [key(k) for k in range(1000, 1100)]
    wrong = [k for k in absent if fn([k], params.ctypes.data, unlinked.ctypes.data) != []]
    assert wrong  # the broken lookup takes absent keys for stored ones
    assert [table.find_run([k]) for k in wrong] == [[]] * len(wrong)


class _Bytes(bytes):
    """A bytes subclass: the manager's Python check decides about it, not the C one."""


_BAD = st.one_of(
    st.binary(max_size=15), st.binary(min_size=17, max_size=32),
    st.binary(min_size=16, max_size=16).map(bytearray),
    st.binary(min_size=16, max_size=16).map(_Bytes), st.integers(), st.text(max_size=16),
    st.none())


@needs_native
@settings(max_examples=300, deadline=None)
@given(good=st.lists(st.binary(min_size=16, max_size=16), max_size=70),
       bad=st.lists(st.tuples(st.integers(0, 70), _BAD), max_size=2))
def test_the_compiled_hash_check_passes_a_list_only_of_exact_16_byte_bytes(
        good: list[bytes], bad: list[tuple[int, object]]) -> None:
    # The manager skips its Python check of a match's hashes when this says True: it
    # must never pass an item that check would refuse (nor a subclass it cannot judge).
    items: list[object] = list(good)
    for at, item in bad:
        items.insert(at, item)
    assert _registry_native.all_keys(items) == (not bad)
    assert _registry_native.all_keys(tuple(items)) is False  # the manager passes a list


def test_without_the_compiled_code_the_hash_check_leaves_the_decision_to_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cc, "compiler", lambda: None)
    monkeypatch.setattr(_registry_native, "_lib", _cc.Once(_registry_native._build))
    assert _registry_native.all_keys([key(1), key(2)]) is False

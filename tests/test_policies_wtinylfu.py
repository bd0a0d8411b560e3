"""W-TinyLFU eviction and its frequency sketch: the window, the duel, the segments, aging."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.registry import BlockRegistry
from kvbm_policies import FrequencySketch, WTinyLFUPolicy
from kvbm_policies.sketch import key_hash


def _fill(reg: BlockRegistry, keys: list[int]) -> None:
    for k in keys:
        slot = reg.allocate(k)
        assert slot is not None
        reg.commit(slot)


def _hit(reg: BlockRegistry, k: int) -> None:
    slot = reg.pin(k)
    assert slot is not None
    reg.unpin(slot)


def test_sketch_counts_each_addition_up_to_fifteen() -> None:
    s = FrequencySketch(64)
    assert [s.add("k") for _ in range(17)][-3:] == [15, 15, 15]
    assert s.estimate("k") == 15
    assert s.estimate("never") == 0


def test_sketch_halves_every_count_after_sample_additions() -> None:
    s = FrequencySketch(64, sample=10)
    for _ in range(9):
        s.add(b"hot-key-1234567")
    assert s.estimate(b"hot-key-1234567") == 9
    s.add(b"hot-key-1234567")  # the tenth addition triggers the reset
    assert s.estimate(b"hot-key-1234567") == 5 and s.resets == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=200))
def test_sketch_never_underestimates_before_a_reset(keys: list[int]) -> None:
    s = FrequencySketch(64, sample=10_000)
    for k in keys:
        s.add(k)
    for k in set(keys):
        assert s.estimate(k) >= min(keys.count(k), 15)


def test_key_hash_is_the_same_in_every_process() -> None:
    # Never Python's salted hash(): victims must not change from run to run.
    assert key_hash(b"\x01" * 16) == 0x63C58E149D508D3D
    assert key_hash(7) == key_hash(7) != key_hash(8)


def test_wtinylfu_a_scan_of_one_off_blocks_keeps_a_block_seen_often() -> None:
    policy = WTinyLFUPolicy(20, adaptive=False)
    reg = BlockRegistry("t", 20, policy)
    _fill(reg, list(range(20)))
    for _ in range(4):
        _hit(reg, 5)
    _fill(reg, list(range(100, 160)))  # each seen once
    assert 5 in reg


def test_wtinylfu_a_candidate_seen_more_often_than_the_main_victim_enters_main() -> None:
    policy = WTinyLFUPolicy(10, window_ratio=0.1, adaptive=False)
    reg = BlockRegistry("t", 10, policy)
    _fill(reg, list(range(10)))
    for _ in range(3):
        policy.sketch.add(50)  # 50 was seen three times before (its count survives eviction)
    _fill(reg, [50, 51])  # 51 pushes 50 out of the window: 50 duels and wins
    assert policy.segment(50) == "probation"


def test_wtinylfu_a_hit_in_probation_promotes_to_protected() -> None:
    policy = WTinyLFUPolicy(10, window_ratio=0.1, adaptive=False)
    reg = BlockRegistry("t", 10, policy)
    _fill(reg, list(range(10)))
    assert policy.segment(0) == "probation"
    _hit(reg, 0)
    assert policy.segment(0) == "protected"


def test_wtinylfu_the_window_size_moves_after_a_sample_of_accesses() -> None:
    policy = WTinyLFUPolicy(64)
    reg = BlockRegistry("t", 64, policy)
    before = policy.window_max
    _fill(reg, list(range(200)))  # more than one sample (max(16, capacity) accesses)
    assert policy.window_max != before


@pytest.mark.parametrize(("options", "words"), [
    ({"window_ratio": 1.0}, "'window_ratio'"),
    ({"protected_ratio": -0.1}, "'protected_ratio'"),
    ({"adaptive": "maybe"}, "'adaptive'"),
    ({"size": 3}, "unknown option 'size'"),
])
def test_wtinylfu_bad_option_names_it(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        WTinyLFUPolicy(8, **options)


def test_wtinylfu_accepts_options_as_environment_strings() -> None:
    p = WTinyLFUPolicy(100, window_ratio="0.2", adaptive="false")
    assert p.window_max == 20 and p.adaptive is False

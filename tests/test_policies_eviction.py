"""Eviction policies: invariants under random operations through the real BlockRegistry,
and each policy's own order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm import KvBlockManager
from kvbm.errors import ConfigError
from kvbm.plugins import build_plugins
from kvbm.policy import EvictionPolicy, LRUPolicy
from kvbm.registry import BlockRegistry, SlotState
from kvbm_policies import (
    AdaptivePolicy,
    ARCPolicy,
    LFUPolicy,
    LIRSPolicy,
    PrefixLRUPolicy,
    PriorityLRUPolicy,
    S3FIFOPolicy,
    WTinyLFUPolicy,
)
from kvbm_policies.learned import LearnedPolicy

POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "priority": PriorityLRUPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "lirs": LIRSPolicy,
    "wtinylfu": WTinyLFUPolicy,
    "prefix": PrefixLRUPolicy,
    "adaptive": AdaptivePolicy,
    # Switching leader on every sampled access: the hand-over itself under random calls.
    "adaptive-switching": lambda c: AdaptivePolicy(c, candidates="lru,lirs,arc,wtinylfu,prefix",
                                                   period=1, margin=0.0),
    "learned": LearnedPolicy,
    # Every class cold after one sample: the cold queue on every path.
    "learned-cold": lambda c: LearnedPolicy(c, threshold=1.0, sample=2, min_samples=1),
}

# One operation on a tier: offer a block (maybe committed pinned, as the cascade does),
# match one (pins it), release a held pin, remove a block, or evict one.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("offload"), st.integers(0, 11), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("match"), st.integers(0, 11)),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("remove"), st.integers(0, 11)),
        st.tuples(st.just("evict")),
    ),
    max_size=60,
)


def _evictable(reg: BlockRegistry) -> set[Any]:
    return {k for k, s in reg.registered() if reg.pins_at(s) == 0}


def _pinned(reg: BlockRegistry) -> set[Any]:
    return {k for k, s in reg.registered() if reg.pins_at(s) > 0}


def _run(policy: EvictionPolicy, capacity: int, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Apply ``ops`` to a registry using ``policy``; check the invariants after each; return victims."""
    reg = BlockRegistry("t", capacity, policy)
    held: list[int] = []
    victims: list[Any] = []
    for op in ops:
        evictable_before = _evictable(reg)
        pinned_before = _pinned(reg)
        if op[0] == "offload":
            _, k, prio, pinned = op
            slot = reg.allocate(k)
            if slot is None:
                # Refused only for a block already there, or a tier with nothing evictable.
                assert k in reg or not evictable_before, f"allocate({k}) refused with {evictable_before} evictable"
            else:
                reg.commit(slot, prio, pinned=pinned)
                if pinned:
                    held.append(slot)
        elif op[0] == "match":
            slot = reg.pin(op[1])
            if slot is not None:
                held.append(slot)
        elif op[0] == "release" and held:
            reg.unpin(held.pop(op[1] % len(held)))
        elif op[0] == "remove":
            reg.remove(op[1])
        elif op[0] == "evict":
            got = reg.evict()
            assert (got is None) == (not evictable_before)
        for key, _slot in reg.take_evicted():
            assert key in evictable_before, f"victim {key} was not evictable"
            assert key not in pinned_before, f"victim {key} was pinned"
            victims.append(key)
        assert reg.num_used <= capacity
        assert len(policy) == len(_evictable(reg)), "policy holds exactly the evictable blocks"
    return victims


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 6), ops=OPS)
def test_victims_come_only_from_evictable_blocks_and_never_pinned(
    name: str, capacity: int, ops: list[tuple[Any, ...]]
) -> None:
    _run(POLICIES[name](capacity), capacity, ops)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(1, 6), ops=OPS)
def test_same_operations_give_same_victims(name: str, capacity: int, ops: list[tuple[Any, ...]]) -> None:
    first = _run(POLICIES[name](capacity), capacity, ops)
    second = _run(POLICIES[name](capacity), capacity, ops)
    assert first == second


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(1, 6), ops=OPS)
def test_draining_the_policy_frees_every_unpinned_block(
    name: str, capacity: int, ops: list[tuple[Any, ...]]
) -> None:
    policy = POLICIES[name](capacity)
    reg = BlockRegistry("t", capacity, policy)
    held: list[int] = []
    for op in ops:  # the same operations, without checks, then evict until empty
        if op[0] == "offload" and (slot := reg.allocate(op[1])) is not None:
            reg.commit(slot, op[2], pinned=op[3])
            if op[3]:
                held.append(slot)
        elif op[0] == "match" and (slot := reg.pin(op[1])) is not None:
            held.append(slot)
        elif op[0] == "release" and held:
            reg.unpin(held.pop(op[1] % len(held)))
        elif op[0] == "remove":
            reg.remove(op[1])
    pinned = _pinned(reg)
    while reg.evict() is not None:
        pass
    assert len(policy) == 0
    assert {k for k, _ in reg.registered()} == pinned
    assert all(reg.state_at(s) is SlotState.REGISTERED for _, s in reg.registered())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_capacity_is_respected_when_every_block_is_evictable(name: str) -> None:
    reg = BlockRegistry("t", 4, POLICIES[name](4))
    for k in range(40):
        slot = reg.allocate(k)
        assert slot is not None, "a full tier of unpinned blocks always makes room"
        reg.commit(slot)
        assert reg.num_used <= 4
    assert reg.evictions == 36


def _fill(reg: BlockRegistry, keys: list[int], prio: int = 0) -> None:
    for k in keys:
        slot = reg.allocate(k)
        assert slot is not None
        reg.commit(slot, prio)


def _hit(reg: BlockRegistry, k: int) -> None:
    slot = reg.pin(k)
    assert slot is not None
    reg.unpin(slot)


def test_lfu_evicts_the_least_hit_block() -> None:
    reg = BlockRegistry("t", 3, LFUPolicy(3))
    _fill(reg, [1, 2, 3])
    _hit(reg, 1)
    _hit(reg, 1)
    _hit(reg, 3)
    _fill(reg, [4])
    assert 2 not in reg and {1, 3, 4} <= {k for k, _ in reg.registered()}


def test_lfu_aging_lets_new_blocks_outlive_an_old_hit_count() -> None:
    reg = BlockRegistry("t", 2, LFUPolicy(2))
    _fill(reg, [0])
    for _ in range(3):
        _hit(reg, 0)  # block 0: value 4
    for k in range(1, 8):
        _fill(reg, [k])  # each eviction raises the age by one
        _hit(reg, k)
    assert 0 not in reg, "without aging block 0's four hits would keep it forever"


def test_priority_order_is_priority_then_release_time() -> None:
    policy = PriorityLRUPolicy(8)
    reg = BlockRegistry("t", 8, policy)
    _fill(reg, [10, 11], prio=50)
    _fill(reg, [20, 21], prio=5)
    _hit(reg, 20)
    _hit(reg, 10)
    order = [reg.evict()[0] for _ in range(4)]  # type: ignore[index]
    assert order == [21, 20, 11, 10]


def test_priority_of_a_block_committed_pinned_survives_its_release() -> None:
    reg = BlockRegistry("t", 4, PriorityLRUPolicy(4))
    slot = reg.allocate(1)
    assert slot is not None
    reg.commit(slot, 90, pinned=True)  # the write-through cascade holds it
    _fill(reg, [2], prio=10)
    reg.unpin(slot)
    assert reg.evict()[0] == 2  # type: ignore[index]


def test_arc_keeps_a_block_hit_twice_through_a_scan() -> None:
    reg = BlockRegistry("t", 4, ARCPolicy(4))
    _fill(reg, [1])
    _hit(reg, 1)  # 1 moves to T2
    _fill(reg, list(range(100, 110)))  # a scan of one-time blocks
    assert 1 in reg


def test_arc_a_ghost_hit_in_b1_grows_the_recency_target() -> None:
    policy = ARCPolicy(2)
    reg = BlockRegistry("t", 2, policy)
    _fill(reg, [1])
    _hit(reg, 1)  # T2 = [1]
    _fill(reg, [2, 3])  # 2 evicted from T1 into B1
    assert 2 not in reg and policy.target_t1 == 0
    _fill(reg, [2])
    assert policy.target_t1 > 0


def test_s3fifo_drops_one_hit_wonders_before_a_block_hit_in_the_small_queue() -> None:
    reg = BlockRegistry("t", 10, S3FIFOPolicy(10))
    _fill(reg, [0])
    _hit(reg, 0)
    _fill(reg, list(range(1, 20)))
    assert 0 in reg
    assert 1 not in reg


def test_s3fifo_a_block_back_from_the_ghost_queue_enters_main() -> None:
    policy = S3FIFOPolicy(10)
    reg = BlockRegistry("t", 10, policy)
    _fill(reg, list(range(11)))  # 0 leaves small for the ghost queue
    assert 0 not in reg
    _fill(reg, [0])
    assert 0 in policy._main


def test_lirs_keeps_hitting_a_loop_larger_than_the_cache() -> None:
    def hits(policy: EvictionPolicy) -> int:
        reg = BlockRegistry("t", 8, policy)
        n = 0
        for _ in range(10):
            for k in range(10):  # a loop of 10 blocks through 8 slots
                slot = reg.pin(k)
                if slot is not None:
                    n += 1
                    reg.unpin(slot)
                else:
                    _fill(reg, [k])
        return n

    assert hits(LRUPolicy(8)) == 0
    assert hits(LIRSPolicy(8)) >= 50


@pytest.mark.parametrize(("policy", "options", "words"), [
    ("s3fifo", {"small_ratio": 1.5}, "'small_ratio'"),
    ("lirs", {"hir_ratio": "x"}, "'hir_ratio'"),
    ("lfu", {"aging": 2}, "unknown option 'aging'"),
    ("learned", {"threshold": 2}, "'threshold': value 2 is out of range"),
])
def test_bad_policy_option_names_the_tier_and_key(
    small_config: dict[str, Any], policy: str, options: dict[str, Any], words: str
) -> None:
    small_config["tiers"][0].update(policy=policy, policy_options=options)
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(small_config, plugins=build_plugins())
    msg = str(e.value)
    assert "tier 'host'" in msg and "key 'policy'" in msg and words in msg
    assert "\n" not in msg


def test_unknown_policy_name_names_the_tier_key_and_known_policies(small_config: dict[str, Any]) -> None:
    small_config["tiers"][0]["policy"] = "fifo"
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(small_config, plugins=build_plugins())
    msg = str(e.value)
    assert "tier 'host'" in msg and "'fifo'" in msg and "lirs" in msg and "s3fifo" in msg


@pytest.mark.parametrize("name", ["lfu", "priority", "arc", "s3fifo", "lirs", "wtinylfu", "prefix",
                                  "adaptive", "learned"])
def test_policy_is_chosen_per_tier_from_the_config(small_config: dict[str, Any], name: str) -> None:
    small_config["tiers"][0]["policy"] = name
    with KvBlockManager.from_config(small_config, plugins=build_plugins()) as mgr:
        assert type(mgr.chain[0].registry.policy) is POLICIES[name]

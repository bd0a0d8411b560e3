"""Prefix-aware eviction: leaves first, parents read from the order of pins and inserts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.registry import BlockRegistry
from kvbm_policies import PrefixLRUPolicy


def _request(reg: BlockRegistry, keys: list[int]) -> int:
    """One request as the simulator runs it: pin the cached prefix, add the rest, release."""
    pinned: list[int] = []
    for k in keys:
        slot = reg.pin(k)
        if slot is None:
            break
        pinned.append(slot)
    for k in keys[len(pinned):]:
        slot = reg.allocate(k)
        if slot is not None:
            reg.commit(slot)
    for slot in reversed(pinned):
        reg.unpin(slot)
    return len(pinned)


def test_prefix_a_requests_new_blocks_go_tail_first() -> None:
    policy = PrefixLRUPolicy(8)
    reg = BlockRegistry("t", 8, policy)
    _request(reg, [0])
    _request(reg, [0, 1, 2, 3])  # 1, 2, 3 follow the hit on 0: a chain
    order = [reg.evict()[0] for _ in range(4)]  # type: ignore[index]
    assert order == [3, 2, 1, 0]


def test_prefix_a_parent_released_before_its_child_still_outlives_it() -> None:
    # The write-through cascade commits a save's blocks pinned and releases them first
    # to last, so LRU would drop the head of the chain first and orphan the rest.
    policy = PrefixLRUPolicy(8)
    reg = BlockRegistry("t", 8, policy)
    slots = []
    for k in (0, 1, 2):
        slot = reg.allocate(k)
        assert slot is not None
        reg.commit(slot, pinned=True)
        slots.append(slot)
    for slot in slots:
        reg.unpin(slot)
    assert (policy.parent(1), policy.parent(2)) == (0, 1)
    assert [reg.evict()[0] for _ in range(3)] == [2, 1, 0]  # type: ignore[index]


def test_prefix_an_insert_after_no_hit_starts_no_chain() -> None:
    # Between two requests with no hit nothing separates one's last block from the
    # next one's first, so no parent is guessed.
    policy = PrefixLRUPolicy(8)
    reg = BlockRegistry("t", 8, policy)
    _request(reg, [0, 1])
    _request(reg, [5, 6])
    assert policy.parent(1) is None and policy.parent(5) is None


def test_prefix_a_match_corrects_a_guessed_parent() -> None:
    policy = PrefixLRUPolicy(8)
    reg = BlockRegistry("t", 8, policy)
    _request(reg, [0])
    _request(reg, [0, 1])  # 1 follows 0
    _request(reg, [7])
    _request(reg, [7, 1])  # 7 hit, then 1 hit: 1 now follows 7
    assert policy.parent(1) == 7


def test_prefix_the_first_block_a_match_pins_is_a_root() -> None:
    policy = PrefixLRUPolicy(8)
    reg = BlockRegistry("t", 8, policy)
    _request(reg, [0])
    _request(reg, [0, 1])
    _request(reg, [1])  # a request starting at 1: 1 is a root there
    assert policy.parent(1) is None


def _path(node: int) -> list[int]:
    """Keys from the root to ``node`` in a binary prefix tree (node k's parent is k // 2):
    requests share prefixes exactly as sequence hashes make them."""
    out = []
    while node:
        out.append(node)
        node //= 2
    return out[::-1]


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(2, 8), ends=st.lists(st.integers(1, 31), min_size=1, max_size=25))
def test_prefix_victim_is_a_leaf_of_the_cached_tree(capacity: int, ends: list[int]) -> None:
    policy = PrefixLRUPolicy(capacity)
    reg = BlockRegistry("t", capacity, policy)
    for end in ends:
        _request(reg, _path(end))
    cached = {k for k, _ in reg.registered()}
    leaves = {k for k in cached if not any(policy.parent(c) == k for c in cached)}
    got = reg.evict()
    assert got is not None and got[0] in leaves

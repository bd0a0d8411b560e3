"""The adaptive policy: shadows per candidate, the switch, its options."""

from __future__ import annotations

from typing import Any

import pytest

from kvbm.registry import BlockRegistry
from kvbm_policies import AdaptivePolicy
from kvbm_policies.replay import replay
from kvbm_policies.workloads import Trace


def _loop(blocks: int, laps: int) -> Trace:
    """One-block requests going round a loop: LRU never hits, LIRS keeps most of it."""
    return Trace("loop", [[k] for _ in range(laps) for k in range(blocks)])


def test_adaptive_starts_with_its_first_candidate() -> None:
    assert AdaptivePolicy(64).leader == "lru"
    assert AdaptivePolicy(64, candidates="lirs,lru").leader == "lirs"


def test_adaptive_switches_to_the_candidate_whose_shadow_hits_more() -> None:
    policy = AdaptivePolicy(80, period=20)
    replay(_loop(100, 30), policy, 80, engine="python")  # the policy itself, not the C loop
    assert policy.leader == "lirs" and policy.switches >= 1


def test_adaptive_after_the_switch_hits_like_the_better_candidate() -> None:
    trace = _loop(100, 30)
    adaptive = replay(trace, AdaptivePolicy(80, period=20), 80).hits
    lru = replay(trace, AdaptivePolicy(80, candidates="lru"), 80).hits
    assert lru == 0 and adaptive > len(trace.requests) // 2


def test_adaptive_keeps_its_leader_when_no_candidate_hits_more_by_the_margin() -> None:
    # A cache that holds everything: every candidate hits alike.
    policy = AdaptivePolicy(200, period=10)
    replay(_loop(50, 20), policy, 200, engine="python")
    assert policy.leader == "lru" and policy.switches == 0


def test_adaptive_switch_keeps_every_block_and_its_pins() -> None:
    policy = AdaptivePolicy(8, candidates="lru,lirs")
    reg = BlockRegistry("t", 8, policy)
    for k in range(6):
        slot = reg.allocate(k)
        assert slot is not None
        reg.commit(slot)
    held = reg.pin(2)
    policy._switch(1)
    assert policy.leader == "lirs" and len(policy) == 5
    assert held is not None
    drained = []
    while (got := reg.evict()) is not None:
        drained.append(got[0])
    assert sorted(drained) == [0, 1, 3, 4, 5]  # 2 is pinned: never a victim
    reg.unpin(held)
    assert reg.evict() == (2, held)


def test_adaptive_samples_one_block_in_rate_for_its_shadows() -> None:
    policy = AdaptivePolicy(1 << 16)
    assert policy.rate == 64 and policy.period == (1 << 16) // 64 // 2
    assert AdaptivePolicy(2048).rate == 8  # no shadow under 256 blocks


@pytest.mark.parametrize(("options", "words"), [
    ({"candidates": "lru,nope"}, "'candidates'"),
    ({"candidates": "lru,lru"}, "'candidates'"),
    ({"candidates": ""}, "'candidates'"),
    ({"rate": 3}, "'rate'"),
    ({"margin": -1}, "'margin'"),
    ({"window": 3}, "unknown option 'window'"),
])
def test_adaptive_bad_option_names_it(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        AdaptivePolicy(64, **options)


def test_adaptive_takes_candidates_as_a_list_from_yaml() -> None:
    assert AdaptivePolicy(64, candidates=["arc", "lru"]).candidates == ["arc", "lru"]

"""The fast replay engine makes the registry's calls: same hits, evictions and victims."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.policy import EvictionPolicy, LRUPolicy
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
from kvbm_policies.replay import replay
from kvbm_policies.workloads import Trace
from kvbm_policies.wrap import ForwardingPolicy

POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": LRUPolicy, "lfu": LFUPolicy, "priority": PriorityLRUPolicy, "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy, "lirs": LIRSPolicy, "wtinylfu": WTinyLFUPolicy,
    "prefix": PrefixLRUPolicy,
    "adaptive": lambda c: AdaptivePolicy(c, candidates="lru,lirs,arc", period=2, margin=0.0),
    # Every class cold after one sample: the cold queue on every path.
    "learned": lambda c: LearnedPolicy(c, threshold=1.0, sample=2, min_samples=1),
}


class Recorder(ForwardingPolicy):
    """Wraps a policy and records every call made on it, and every victim."""

    def __init__(self, inner: EvictionPolicy) -> None:
        super().__init__(inner)
        self.calls: list[tuple[Any, ...]] = []

    def insert(self, key: Any, priority: int = 0) -> None:
        self.calls.append(("insert", key, priority))
        super().insert(key, priority)

    def touch(self, key: Any) -> None:
        self.calls.append(("touch", key))
        super().touch(key)

    def pin(self, key: Any) -> None:
        self.calls.append(("pin", key))
        super().pin(key)

    def unpin(self, key: Any) -> None:
        self.calls.append(("unpin", key))
        super().unpin(key)

    def remove(self, key: Any) -> None:
        self.calls.append(("remove", key))
        super().remove(key)

    def victim(self) -> Any:
        v = super().victim()
        self.calls.append(("victim", v))
        return v


REQUESTS = st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=8, unique=True), max_size=30)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("release", ["reverse", "forward"])
@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 8), requests=REQUESTS)
def test_fast_engine_calls_the_policy_exactly_as_the_registry_does(
    name: str, release: str, capacity: int, requests: list[list[int]]
) -> None:
    trace = Trace("t", requests)
    fast = Recorder(POLICIES[name](capacity))
    slow = Recorder(POLICIES[name](capacity))
    a = replay(trace, fast, capacity, release=release, engine="fast")
    b = replay(trace, slow, capacity, release=release, engine="registry")
    assert fast.calls == slow.calls
    assert (a.hits, a.evictions) == (b.hits, b.evictions)


def test_a_request_naming_a_key_twice_replays_through_the_registry() -> None:
    # Pin counts above one are the registry's business: the fast loop does not model them.
    trace = Trace("t", [[1, 2], [1, 1, 2]])
    assert trace.has_repeats
    assert replay(trace, LRUPolicy(4), 4).hits == replay(trace, LRUPolicy(4), 4, engine="registry").hits


def test_replay_gives_each_new_block_its_priority() -> None:
    trace = Trace("t", [[1, 2], [3]])
    rec = Recorder(LRUPolicy(4))
    replay(trace, rec, 4, priorities=lambda r, b: 10 * r + b)
    assert [c for c in rec.calls if c[0] == "insert"] == [("insert", 1, 0), ("insert", 2, 1),
                                                           ("insert", 3, 10)]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"release": "sideways"}, "release"),
    ({"engine": "gpu"}, "engine"),
])
def test_replay_bad_argument_names_it(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        replay(Trace("t", [[1]]), LRUPolicy(1), 1, **kwargs)

"""ForwardingPolicy: a wrapper that passes every call on changes no victim and no path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.policy import EvictionPolicy, LRUPolicy
from kvbm_policies import LFUPolicy, S3FIFOPolicy, WTinyLFUPolicy
from kvbm_policies.replay import replay
from kvbm_policies.workloads import Trace
from kvbm_policies.wrap import ForwardingPolicy

REQUESTS = st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=8, unique=True),
                    max_size=40)


@pytest.mark.parametrize("make", [LRUPolicy, LFUPolicy, S3FIFOPolicy], ids=["lru", "lfu", "s3fifo"])
@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 8), requests=REQUESTS)
def test_a_forwarding_wrapper_hits_and_evicts_exactly_as_the_policy_it_wraps(
        make: Callable[[int], EvictionPolicy], capacity: int, requests: list[list[int]]) -> None:
    trace = Trace("t", requests)
    alone = replay(trace, make(capacity), capacity)
    wrapped = replay(trace, ForwardingPolicy(make(capacity)), capacity)
    assert (wrapped.hits, wrapped.evictions) == (alone.hits, alone.evictions)


def test_a_forwarding_wrapper_hides_the_inner_policys_optional_hooks() -> None:
    inner = WTinyLFUPolicy(8)
    assert hasattr(inner, "prepare_keys")
    assert not hasattr(ForwardingPolicy(inner), "prepare_keys")

"""The simulator's optional ``prepare_keys``: per-key constants computed in bulk must be
exactly the ones computed key by key, so a prepared policy picks the same victims."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.policy import EvictionPolicy
from kvbm_policies import AdaptivePolicy, WTinyLFUPolicy
from kvbm_policies.replay import replay
from kvbm_policies.sketch import key_hash, sketch_positions
from kvbm_policies.workloads import Trace
from kvbm_policies.wrap import ForwardingPolicy


def _positions(key: Any, mask: int) -> tuple[int, int, int, int]:
    h = key_hash(key)
    return h & mask, (h >> 16) & mask, (h >> 32) & mask, ((h >> 48) ^ (h >> 5)) & mask


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.integers(0, (1 << 63) - 1), max_size=50),
       bits=st.integers(4, 24))
def test_sketch_positions_in_bulk_equal_the_sketch_hash_of_each_key(keys: list[int], bits: int) -> None:
    mask = (1 << bits) - 1
    got = sketch_positions(keys, mask)
    assert got == {k: _positions(k, mask) for k in keys}


def test_sketch_positions_skip_keys_a_uint64_cannot_hold_exactly() -> None:
    # Negative, 2**63 and above, bytes: left to be hashed one by one when seen.
    got = sketch_positions([-1, 1 << 63, b"\x01" * 16, 5], 0xFFFF)
    assert list(got) == [5]


class Unprepared(ForwardingPolicy):
    """Passes every call on and records victims; offers no ``prepare_keys`` to the replay."""

    def __init__(self, inner: EvictionPolicy) -> None:
        super().__init__(inner)
        self.victims: list[Any] = []

    def victim(self) -> Any:
        v = super().victim()
        self.victims.append(v)
        return v


PREPARED: dict[str, Callable[[int], EvictionPolicy]] = {
    "wtinylfu": WTinyLFUPolicy,
    # rate 2: half the keys sampled, so a wrong membership shows; period 2, margin 0:
    # the leader switches, and a new W-TinyLFU leader is prepared too.
    "adaptive": lambda c: AdaptivePolicy(c, candidates="lru,wtinylfu,lirs", rate=2, period=2,
                                         margin=0.0),
}

REQUESTS = st.lists(st.lists(st.integers(0, 1 << 40), min_size=1, max_size=8, unique=True),
                    max_size=40)


@pytest.mark.parametrize("name", sorted(PREPARED))
@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 12), requests=REQUESTS, reuse=st.data())
def test_a_prepared_policy_picks_the_same_victims_as_one_hashing_key_by_key(
    name: str, capacity: int, requests: list[list[int]], reuse: st.DataObject
) -> None:
    # Bring keys back (the interesting case) by repeating some earlier requests.
    if requests:
        for _ in range(reuse.draw(st.integers(0, 20))):
            requests.append(requests[reuse.draw(st.integers(0, len(requests) - 1))])
    trace = Trace("t", requests)
    keys = sorted({k for r in requests for k in r})
    prepared = PREPARED[name](capacity)
    prepared.prepare_keys(keys)  # type: ignore[attr-defined]
    a = Unprepared(prepared)  # the replay does not prepare again
    b = Unprepared(PREPARED[name](capacity))
    ra = replay(trace, a, capacity)
    rb = replay(trace, b, capacity)
    assert a.victims == b.victims
    assert (ra.hits, ra.evictions) == (rb.hits, rb.evictions)


def test_replay_prepares_a_policy_that_offers_it_with_the_traces_distinct_keys() -> None:
    seen: list[list[int]] = []

    class Spy(WTinyLFUPolicy):
        def prepare_keys(self, keys: Any) -> None:
            seen.append(sorted(keys))
            super().prepare_keys(keys)

    replay(Trace("t", [[3, 1], [3, 1, 2]]), Spy(4), 4)
    assert seen == [[1, 2, 3]]

"""The simulator's native replay loops pick exactly the Python policies' victims."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policies_victims import GOLDEN, VictimLog

from kvbm import _cc
from kvbm.policy import EvictionPolicy
from kvbm_policies import (
    AdaptivePolicy,
    ARCPolicy,
    LFUPolicy,
    LIRSPolicy,
    PrefixLRUPolicy,
    PriorityLRUPolicy,
    S3FIFOPolicy,
    WTinyLFUPolicy,
    native,
)
from kvbm_policies.families import make_workload
from kvbm_policies.replay import replay
from kvbm_policies.workloads import Trace

NATIVE: dict[str, Callable[..., EvictionPolicy]] = {
    "lirs": LIRSPolicy, "wtinylfu": WTinyLFUPolicy, "prefix": PrefixLRUPolicy,
    "adaptive": AdaptivePolicy,  # its default candidates, lru and lirs
    "arc": ARCPolicy, "s3fifo": S3FIFOPolicy, "priority": PriorityLRUPolicy, "lfu": LFUPolicy,
}

needs_cc = pytest.mark.skipif(not native.available(), reason="no C compiler: no native loop")


def _python_victims(trace: Trace, policy: EvictionPolicy, cap: int,
                    release: str = "reverse") -> tuple[int, int, list[Any]]:
    log = VictimLog(policy)  # a wrapper: never the native loop
    r = replay(trace, log, cap, release=release, engine="python")
    return r.hits, r.evictions, log.victims


def _native_victims(trace: Trace, policy: EvictionPolicy, cap: int,
                    release: str = "reverse") -> tuple[int, int, list[Any]]:
    victims: list[Any] = []
    got = native.replay(trace, policy, cap, release == "reverse", victims)
    assert got is not None, "the native loop declined"
    return got[0], got[1], victims


_TRACES: dict[str, Trace] = {}


def _trace(family: str) -> Trace:
    if family not in _TRACES:
        _TRACES[family] = make_workload(family)
    return _TRACES[family]


@pytest.fixture(params=["native", "python"])
def path(request: pytest.FixtureRequest) -> Callable[..., tuple[int, int, list[Any]]]:
    if request.param == "native" and not native.available():
        pytest.skip("no C compiler: no native loop")
    return _native_victims if request.param == "native" else _python_victims


@pytest.mark.parametrize("case", sorted(c for c in GOLDEN if c.split("/")[2] in NATIVE))
def test_both_paths_pick_the_pinned_victims(case: str, path: Callable[..., Any]) -> None:
    family, frac, name = case.split("/")
    trace = _trace(family)
    cap = trace.working_set // int(frac)
    hits, evictions, victims = path(trace, NATIVE[name](cap), cap)
    digest = hashlib.sha256(repr(victims).encode()).hexdigest()[:16]
    assert (hits, evictions, digest) == GOLDEN[case]


OPTIONS = st.sampled_from([
    ("lirs", {}), ("lirs", {"hir_ratio": 0.3}),
    ("wtinylfu", {}), ("wtinylfu", {"window_ratio": 0.3, "protected_ratio": 0.5}),
    ("wtinylfu", {"adaptive": False}), ("prefix", {}), ("arc", {}), ("priority", {}), ("lfu", {}),
    ("s3fifo", {}), ("s3fifo", {"promote_at": 2, "small_ratio": 0.5}),
    # Sampling every key and deciding every few accesses: the leader switches often.
    ("adaptive", {"rate": 1, "period": 2, "margin": 0.0}),
    ("adaptive", {"candidates": "lirs,lru", "rate": 2, "period": 3, "margin": 0.0}),
])
# Keys as tiers never see them (negative, past 2**62) but the simulator may: the
# loops rank keys, and W-TinyLFU hashes them as 64-bit words.
KEYS = st.sampled_from([0, 1, 2, 3, 5, 8, 13, 21, -7, 2**62 + 1, 2**40, 77, 4096, 99, 100, 101])
REQUESTS = st.lists(st.lists(KEYS, min_size=1, max_size=8, unique=True), min_size=1, max_size=40)


@needs_cc
@settings(max_examples=200, deadline=None)
@given(spec=OPTIONS, capacity=st.integers(1, 10), requests=REQUESTS,
       release=st.sampled_from(["reverse", "forward"]))
def test_native_and_python_victims_are_identical_on_random_traces(
    spec: tuple[str, dict[str, Any]], capacity: int, requests: list[list[int]], release: str
) -> None:
    name, options = spec
    trace = Trace("random", requests)
    py = _python_victims(trace, NATIVE[name](capacity, **options), capacity, release)
    nat = _native_victims(trace, NATIVE[name](capacity, **options), capacity, release)
    assert nat == py


@needs_cc
@pytest.mark.parametrize("frac", [8, 64])
def test_adaptive_hands_its_pinned_blocks_to_a_new_leader_in_the_python_sets_order(frac: int) -> None:
    # On tenants at 1/8 and 1/64 the leader switches with pinned blocks, and the order a
    # new LIRS leader receives them in changes victims (a dict's insertion order instead
    # of the set's gave other victims): the loop keeps a real CPython set for them.
    trace = _trace("tenants")
    cap = trace.working_set // frac
    policy = AdaptivePolicy(cap)
    py = _python_victims(trace, policy, cap)
    stats: dict[str, Any] = {}
    victims: list[Any] = []
    got = native.replay(trace, AdaptivePolicy(cap), cap, True, victims, stats)
    assert policy.switches >= 5
    assert (got, victims) == ((py[0], py[1]), py[2])
    assert (stats["switches"], stats["leader"]) == (policy.switches, policy.leader)


@needs_cc
def test_adaptive_with_a_candidate_that_has_no_loop_takes_the_python_loop() -> None:
    assert native.replay(Trace("t", [[1, 2]]), AdaptivePolicy(4, candidates="lru,arc"), 4, True) is None


@needs_cc
def test_wtinylfu_loop_ends_with_the_window_the_policy_climbs_to() -> None:
    trace = _trace("agentic")
    cap = trace.working_set // 4
    policy = WTinyLFUPolicy(cap)
    replay(trace, policy, cap, engine="python")
    stats: dict[str, Any] = {}
    native.replay(trace, WTinyLFUPolicy(cap), cap, True, None, stats)
    assert stats["window_max"] == policy.window_max != WTinyLFUPolicy(cap).window_max


@needs_cc
def test_the_victim_comparison_tells_two_policies_apart() -> None:
    # Negative control: the check above would see a loop that ported the wrong policy.
    trace = _trace("multi-turn")
    cap = trace.working_set // 4
    nat = _native_victims(trace, LIRSPolicy(cap), cap)
    other = _python_victims(trace, LIRSPolicy(cap, hir_ratio=0.3), cap)
    assert nat[2] != other[2]


@needs_cc
@pytest.mark.parametrize("name", sorted(NATIVE))
def test_fast_replay_takes_the_native_loop_and_leaves_the_policy_as_built(name: str) -> None:
    trace = _trace("multi-turn")
    cap = trace.working_set // 4
    policy = NATIVE[name](cap)
    r = replay(trace, policy, cap)
    assert len(policy) == 0  # the loop kept its own state
    py = replay(trace, NATIVE[name](cap), cap, engine="python")
    assert (r.hits, r.evictions) == (py.hits, py.evictions) and r.hits > 0


@needs_cc
def test_a_policy_already_used_takes_the_python_loop() -> None:
    policy = LIRSPolicy(4)
    policy.insert(1)
    assert native.replay(Trace("t", [[1, 2]]), policy, 4, True) is None


@needs_cc
def test_a_subclass_takes_the_python_loop() -> None:
    class Mine(WTinyLFUPolicy):
        pass

    assert native.replay(Trace("t", [[1, 2]]), Mine(4), 4, True) is None


@needs_cc
def test_keys_that_are_not_64_bit_ints_take_the_python_loop() -> None:
    assert native.replay(Trace("t", [[2**70, 1]]), LIRSPolicy(4), 4, True) is None
    assert native.replay(Trace("t", [[b"k", b"j"]]), LIRSPolicy(4), 4, True) is None  # type: ignore[list-item]


def test_without_a_compiler_replay_gives_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = _trace("multi-turn")
    cap = trace.working_set // 16
    want = replay(trace, WTinyLFUPolicy(cap), cap)
    monkeypatch.setattr(_cc, "compiler", lambda: None)
    monkeypatch.setattr(native, "_lib", _cc.Once(native._build))  # as in a fresh process
    assert not native.available()
    policy = WTinyLFUPolicy(cap)
    got = replay(trace, policy, cap)
    assert (got.hits, got.evictions) == (want.hits, want.evictions)
    assert len(policy) > 0  # the Python loop ran on the policy itself


def test_disabled_native_loops_decline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "enabled", False)
    assert not native.available()
    assert native.replay(Trace("t", [[1, 2]]), LIRSPolicy(4), 4, True) is None

"""The learned-insertion policy: LRU exactly when it learns nothing, a class it saw never
reused goes in cold, a verdict follows a workload that changes, options fail clearly.

The invariants every policy keeps under random calls through the real BlockRegistry
(victims only evictable, never pinned; deterministic; drains) and the replay
engines' equivalence are checked for ``learned`` with the other policies, in
``test_policies_eviction.py`` and ``test_policies_replay.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvbm.plugins import build_plugins
from kvbm.policy import EvictionPolicy, LRUPolicy
from kvbm_policies.learned import LearnedPolicy
from kvbm_policies.replay import replay
from kvbm_policies.workloads import Trace

# Calls on a policy, kept valid by ``_drive``: insert a new key, hit (pin + touch) an
# evictable one, release a pinned one, remove an evictable one, or ask for a victim;
# few keys and more hits than evictions, so that blocks in the cold queue get hit.
CALLS = st.lists(
    st.tuples(st.sampled_from(["insert", "insert", "hit", "hit", "release", "release",
                               "remove", "victim"]),
              st.integers(0, 7)),
    min_size=10,
    max_size=120,
)


def _drive(policy: EvictionPolicy, calls: list[tuple[str, int]]) -> list[Any]:
    """Apply ``calls`` as a registry would (only valid ones); check that every victim was
    evictable and that the policy holds exactly the evictable keys; return the victims."""
    evictable: set[int] = set()
    pinned: set[int] = set()
    victims: list[Any] = []
    for op, k in calls:
        if op == "insert" and k not in evictable and k not in pinned:
            policy.insert(k)  # type: ignore[arg-type]
            evictable.add(k)
        elif op == "hit" and k in evictable:
            policy.pin(k)  # type: ignore[arg-type]
            policy.touch(k)  # type: ignore[arg-type]
            evictable.discard(k)
            pinned.add(k)
        elif op == "release" and k in pinned:
            policy.unpin(k)  # type: ignore[arg-type]
            pinned.discard(k)
            evictable.add(k)
        elif op == "remove" and k in evictable:
            policy.remove(k)  # type: ignore[arg-type]
            evictable.discard(k)
        elif op == "victim":
            v = policy.victim()
            assert (v is None) == (not evictable)
            if v is not None:
                assert v in evictable, f"victim {v} was not evictable (pinned: {v in pinned})"
                evictable.discard(v)
                victims.append(v)
        assert len(policy) == len(evictable)
    return victims


@settings(max_examples=200, deadline=None)
@given(calls=CALLS)
def test_learned_with_threshold_zero_evicts_exactly_as_lru(calls: list[tuple[str, int]]) -> None:
    # Nothing is ever judged cold: every block follows the LRU, victim for victim.
    learned = LearnedPolicy(16, threshold=0.0, sample=2, min_samples=1)
    assert _drive(learned, calls) == _drive(LRUPolicy(16), calls)


@settings(max_examples=300, deadline=None)
@given(calls=CALLS, probation=st.sampled_from([0.0, 0.0, 0.25, 1.0]), sample=st.integers(2, 3))
# A block inserted cold (the third run, after a sampled one) is hit: it must leave the
# cold queue while pinned.
@example(calls=[("insert", 0), ("hit", 0), ("insert", 2), ("release", 0), ("hit", 0),
                ("insert", 1), ("hit", 1)], probation=0.0, sample=2)
def test_learned_victims_are_evictable_while_every_class_goes_cold(
    calls: list[tuple[str, int]], probation: float, sample: int
) -> None:
    # threshold 1: every class is cold after one sample, so blocks move between the LRU
    # and the cold queue on every path (insert cold, hit out of it, remove from it).
    _drive(LearnedPolicy(16, threshold=1.0, sample=sample, min_samples=1,
                         probation=probation), calls)


def _conversations_and_documents(rounds: int = 16, reread_docs: bool = False,
                                 base: int = 0) -> list[list[int]]:
    """8 conversations taking turns (each turn re-reads its conversation and adds two
    blocks), a one-off 32-block document after every second turn; with ``reread_docs``
    each document is read a second time right away."""
    requests: list[list[int]] = []
    convs = [list(range(base + c * 1000, base + c * 1000 + 8)) for c in range(8)]
    nxt = base + 10**6
    for r in range(rounds):
        for c, conv in enumerate(convs):
            conv.extend((base + c * 1000 + 8 + 2 * r, base + c * 1000 + 9 + 2 * r))
            requests.append(list(conv))
            if c % 2 == 0:
                doc = list(range(nxt, nxt + 32))
                nxt += 32
                requests.append(doc)
                if reread_docs:
                    requests.append(doc)
    return requests


def test_learned_inserts_cold_the_documents_no_one_reads_again() -> None:
    # Between two turns of a conversation LRU sees 128 document blocks and up to 280 of
    # the other conversations' in a cache of 320: most turns miss. The policy learns,
    # from its sample, that blocks inserted with no hit before them are not read again,
    # and keeps the conversations (OPT: 0.549 hits).
    trace = Trace("conversations-and-documents", _conversations_and_documents())
    lru = replay(trace, LRUPolicy(320), 320)
    policy = LearnedPolicy(320)
    learned = replay(trace, policy, 320)
    assert policy.is_cold(behind_hit=False, depth=20)
    assert not policy.is_cold(behind_hit=True, depth=20)  # a conversation's new blocks
    assert learned.hit_rate > lru.hit_rate + 0.2, (learned.hit_rate, lru.hit_rate)


def test_learned_warms_a_class_again_once_its_blocks_are_reused() -> None:
    # Documents first never re-read (the class goes cold), then each read twice in a row:
    # the sampled documents, inserted as LRU would, are hit and the verdict turns back.
    first = _conversations_and_documents()
    then = _conversations_and_documents(reread_docs=True, base=10**7)
    policy = LearnedPolicy(320)
    replay(Trace("never re-read", first), policy, 320)
    assert policy.is_cold(behind_hit=False, depth=20)
    policy = LearnedPolicy(320)
    replay(Trace("then re-read", first + then), policy, 320)
    assert not policy.is_cold(behind_hit=False, depth=20)
    assert policy.reuse_estimate(behind_hit=False, depth=20) > 0.1


def test_learned_is_registered_as_an_eviction_policy() -> None:
    entry = build_plugins().policies.get_kind("eviction", "learned")
    assert entry.load() is LearnedPolicy


@pytest.mark.parametrize(("options", "words"), [
    ({"threshold": 1.5}, ["'threshold'", "1.5", "give a number in [0.0, 1.0]"]),
    ({"sample": 0}, ["'sample'", "0", "give an integer of at least 1"]),
    ({"probation": "half"}, ["'probation'", "'half'", "give a number"]),
    ({"window": 1}, ["'window'", "1", "at least 2"]),
    ({"tresh": 0.1}, ["learned", "'tresh'", "allowed options: min_samples, probation"]),
])
def test_learned_bad_option_names_the_key_the_value_and_the_fix(
    options: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ValueError) as err:
        LearnedPolicy(8, **options)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)

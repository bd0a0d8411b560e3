"""Workload families: each generator's sharing structure, determinism and parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvbm.hashing import BlockHasher, Namespace
from kvbm_policies.families import (
    FAMILIES,
    agentic_trace,
    long_docs_trace,
    make_workload,
    rag_trace,
    tenants_trace,
)
from kvbm_policies.workloads import Trace, request_tokens

SMALL: dict[str, dict[str, Any]] = {
    "multi-turn": {"users": 4, "rounds": 3},
    "agentic": {"sessions": 6, "concurrency": 3},
    "rag": {"requests": 40, "docs": 30},
    "long-docs": {"users": 4, "rounds": 3, "doc_every": 2, "doc_tokens": (256, 512)},
    "tenants": {"scale": 0.1},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_deterministic_for_a_seed(name: str) -> None:
    a = make_workload(name, **SMALL[name], seed=3)
    assert a.requests == make_workload(name, **SMALL[name], seed=3).requests
    assert a.requests != make_workload(name, **SMALL[name], seed=4).requests


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_publishes_every_parameter_with_its_value(name: str) -> None:
    t = make_workload(name, **SMALL[name])
    assert t.info["family"] == name
    for key, value in SMALL[name].items():
        got = t.info[key]
        assert got == (list(value) if isinstance(value, tuple) else value)


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown workload 'chat'.*agentic"):
        make_workload("chat")


def test_agentic_sessions_share_the_system_prompt_and_tool_schemas() -> None:
    t = agentic_trace(sessions=5, concurrency=5, system_tokens=256, tools_tokens=256, page_size=16)
    assert all(r[:32] == t.requests[0][:32] for r in t.requests)
    assert len({r[32] for r in t.requests[:5]}) == 5  # each task is its own


def test_agentic_each_step_extends_the_previous_one_without_branches() -> None:
    t = agentic_trace(sessions=1, concurrency=1, steps=(5, 5), branch_prob=0.0)
    for before, now in zip(t.requests, t.requests[1:]):
        assert now[: len(before)] == before and len(now) > len(before)


def test_agentic_a_branch_restarts_from_an_earlier_step() -> None:
    t = agentic_trace(sessions=1, concurrency=1, steps=(12, 12), branch_prob=1.0, seed=1)
    # With a branch at every step, some step is shorter than the one before it.
    assert any(len(b) < len(a) for a, b in zip(t.requests, t.requests[1:]))
    for now in t.requests[1:]:
        assert any(now == earlier[: len(now)] or earlier[: len(now)] == now
                   for earlier in t.requests) or now[:1] == t.requests[0][:1]


def test_rag_requests_share_the_prompt_and_documents_only_behind_the_same_prefix() -> None:
    t = rag_trace(requests=60, docs=3, docs_per_request=(2, 2), doc_tokens=(64, 64),
                  prompt_tokens=32, followup_prob=0.0, page_size=16)
    first_doc: dict[int, list[int]] = {}
    for r in t.requests:
        assert r[:2] == t.requests[0][:2]  # the instruction prompt
        first_doc.setdefault(r[2], r[:6])
        assert r[:6] == first_doc[r[2]]  # same first block after the prompt: same document
    assert len(first_doc) == 3  # each document can come first, each behind its own keys


def test_rag_a_followup_repeats_a_recent_requests_documents_in_order() -> None:
    t = rag_trace(requests=30, docs_per_request=(2, 2), doc_tokens=(64, 64), prompt_tokens=32,
                  question_tokens=(16, 64), followup_prob=1.0, page_size=16, seed=2)
    first = t.requests[0]  # prompt and two documents: 10 blocks; then its own question
    assert all(r[:10] == first[:10] and r[10] != first[10] for r in t.requests[1:])


def test_long_docs_documents_are_never_read_twice() -> None:
    t = long_docs_trace(users=4, rounds=3, doc_every=2, doc_tokens=(256, 256))
    docs = t.requests[2::3]
    assert all(len(d) == 16 for d in docs)
    others = {k for i, r in enumerate(t.requests) if i % 3 != 2 for k in r}
    seen: set[int] = set()
    for d in docs:
        assert not (set(d) & others) and not (set(d) & seen)
        seen |= set(d)


def test_tenants_never_share_a_block() -> None:
    t = tenants_trace(tenants=3, families=("multi-turn",), scale=0.1)
    sizes: list[int] = t.info["requests_per_tenant"]  # type: ignore[assignment]
    assert len(sizes) == 3
    # Same family and defaults, different salts: the system prompts differ per tenant.
    firsts = {r[0] for r in t.requests}
    assert len(firsts) == 3


def test_tenants_bad_family_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="families must name some of"):
        tenants_trace(families=("chat",))


def test_request_tokens_hash_to_blocks_that_share_exactly_as_the_keys_do() -> None:
    t = Trace("t", [[0, 1, 2], [0, 1, 3], [4, 1, 2]])
    hasher = BlockHasher(Namespace(model_id="m", layout_digest="l"), page_size=4)
    hashed = [hasher.hash_tokens(np.asarray(toks)) for toks in request_tokens(t, 4)]
    assert [len(h) for h in hashed] == [3, 3, 3]
    assert hashed[0][:2] == hashed[1][:2] and hashed[0][2] != hashed[1][2]
    assert hashed[2][0] != hashed[0][0] and hashed[2][1] != hashed[0][1]

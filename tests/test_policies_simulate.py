"""The policy simulator: workloads, Belady's OPT, the replay and ``kvbm simulate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbm.cli import main
from kvbm.policy import LRUPolicy
from kvbm_policies import LIRSPolicy
from kvbm_policies.simulate import belady, replay
from kvbm_policies.workloads import Trace, find_mooncake, load_mooncake, multi_turn_trace

# The public trace in shared/traces/ beside the checkout (see its README), if present.
MOONCAKE = find_mooncake() or Path("missing")


def test_multi_turn_is_deterministic_for_a_seed() -> None:
    assert multi_turn_trace(users=4, rounds=3, seed=7).requests == multi_turn_trace(users=4, rounds=3, seed=7).requests
    assert multi_turn_trace(users=4, rounds=3, seed=7).requests != multi_turn_trace(users=4, rounds=3, seed=8).requests


def test_multi_turn_users_share_the_system_prompt_blocks() -> None:
    t = multi_turn_trace(users=3, rounds=1, system_tokens=64, page_size=16)
    assert all(r[:4] == [0, 1, 2, 3] for r in t.requests)
    tails = [set(r[4:]) for r in t.requests]
    assert not (tails[0] & tails[1]) and not (tails[1] & tails[2])


def test_multi_turn_each_round_extends_that_users_history() -> None:
    users = 3
    t = multi_turn_trace(users=users, rounds=4)
    for i in range(users, len(t.requests)):
        before, now = t.requests[i - users], t.requests[i]
        assert now[: len(before)] == before and len(now) > len(before)


def test_mooncake_ids_expand_into_consecutive_blocks(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text('{"timestamp": 0, "hash_ids": [0, 1]}\n{"timestamp": 1, "hash_ids": [0, 2]}\n')
    assert load_mooncake(f).requests == [[0, 1], [0, 2]]
    assert load_mooncake(f, blocks_per_id=2).requests == [[0, 1, 2, 3], [0, 1, 4, 5]]


def test_mooncake_bad_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text('{"hash_ids": [1]}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: .*'hash_ids'"):
        load_mooncake(f)


def test_opt_evicts_the_block_used_furthest_in_the_future() -> None:
    # A loop of three blocks through two slots: LRU always evicts the next one needed;
    # OPT evicts the one needed last and hits twice.
    t = Trace("t", [[1], [2], [3], [1], [2], [3]])
    assert belady(t, 2).hits == 2
    assert replay(t, LRUPolicy(2), 2).hits == 0


def test_hits_are_the_strict_prefix_of_a_request() -> None:
    t = Trace("t", [[1, 2, 3], [9, 2, 3], [1, 2, 3]])
    res = replay(t, LRUPolicy(8), 8)
    assert res.hits == 3  # the second request misses 9 first, so 2 and 3 do not count
    assert belady(t, 8).hits == 3


def test_replay_is_deterministic() -> None:
    t = multi_turn_trace(users=6, rounds=4)
    a = replay(t, LIRSPolicy(200), 200)
    b = replay(t, LIRSPolicy(200), 200)
    assert (a.hits, a.evictions) == (b.hits, b.evictions)


@pytest.mark.skipif(not MOONCAKE.exists(), reason="shared Mooncake trace not present")
def test_mooncake_lru_and_opt_match_the_trace_readme() -> None:
    # README: capacity 10,981 ids (a quarter of 43,924): LRU 44.3 %, OPT 62.6 %.
    t = load_mooncake(MOONCAKE)
    assert t.working_set == 43924
    # Our LRU pins a request's hits while its misses go in and releases them tail
    # first, which moves LRU by under 0.2 points from the README's plain simulation.
    assert replay(t, LRUPolicy(10981), 10981).hit_rate == pytest.approx(0.443, abs=0.002)
    assert belady(t, 10981).hit_rate == pytest.approx(0.626, abs=0.0005)


def test_best_policy_is_within_ten_percent_of_opt_on_multi_turn() -> None:
    t = multi_turn_trace()
    cap = t.working_set // 4
    opt = belady(t, cap).hit_rate
    assert replay(t, LIRSPolicy(cap), cap).hit_rate >= 0.9 * opt


def test_simulate_command_prints_every_policy_beside_opt(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--users", "4", "--rounds", "3", "--policies", "lru,lirs,s3fifo"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "OPT (Belady)" in out and "accesses/s" in out
    assert all(name in out for name in ("lru", "lirs", "s3fifo"))


def test_simulate_command_json_has_hit_rates_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--users", "4", "--rounds", "3", "--policies", "lru,arc", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert doc["capacity"] == doc["working_set"] // 4
    assert [p["policy"] for p in doc["policies"]] == ["lru", "arc"]
    assert all(0 <= p["hit_rate"] <= 1 and p["ops_per_s"] > 0 for p in doc["policies"])
    assert 0 < doc["opt"]["hit_rate"] <= 1


def test_simulate_command_unknown_policy_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--users", "2", "--rounds", "1", "--policies", "nope"]) == 2
    assert "unknown eviction policy 'nope'" in capsys.readouterr().err


def test_simulate_command_missing_trace_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--trace", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_simulate_command_runs_any_family_with_its_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--workload", "rag", "--param", "requests=30", "--param", "docs=20",
               "--policies", "lru,adaptive"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rag (30 requests, 20 documents" in out
    assert "parameters: requests=30, docs=20" in out and "vs LRU" in out


def test_simulate_command_lists_every_family_with_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--list-workloads"]) == 0
    out = capsys.readouterr().out
    for name in ("multi-turn:", "agentic:", "rag:", "long-docs:", "tenants:", "mooncake:"):
        assert name in out
    assert "branch_prob=0.2" in out


def test_simulate_command_unknown_parameter_names_the_accepted_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["simulate", "--workload", "agentic", "--param", "users=3"]) == 2
    err = capsys.readouterr().err
    assert "takes no parameter 'users'" in err and "sessions" in err


def test_simulate_command_registry_engine_gives_the_same_hits(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--users", "4", "--rounds", "3", "--policies", "lirs,wtinylfu", "--json"]
    main(args)
    fast = json.loads(capsys.readouterr().out)
    main([*args, "--engine", "registry"])
    slow = json.loads(capsys.readouterr().out)
    assert [p["hits"] for p in fast["policies"]] == [p["hits"] for p in slow["policies"]]


def test_simulate_command_passes_options_after_a_policy_name(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--users", "4", "--rounds", "3", "--policies", "lirs:hir_ratio=0.5,lirs",
               "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    a, b = doc["policies"]
    assert a["policy"] == "lirs:hir_ratio=0.5" and a["hits"] != b["hits"]

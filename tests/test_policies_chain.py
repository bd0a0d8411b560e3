"""The chain simulator: per-tier hits, bytes written, admission filters, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbm.cli import main
from kvbm_policies import ReuseWindowFilter, SketchFilter
from kvbm_policies.chain import ChainTier, parse_chain, parse_named, simulate_chain
from kvbm_policies.workloads import Trace, find_mooncake, multi_turn_trace


def _chain(host: int, disk: int, admission: str = "all") -> list[ChainTier]:
    return [ChainTier("host", host), ChainTier("disk", disk, admission=admission)]


def test_chain_tier_hits_add_up_to_the_prefix_hits() -> None:
    t = multi_turn_trace(users=6, rounds=4)
    r = simulate_chain(t, _chain(20, 200))
    assert r.hits == sum(x.hits for x in r.tiers) > 0
    assert r.tiers[1].hits > 0, "the small host tier loses history the disk tier still has"


def test_chain_admit_all_writes_each_block_to_a_disk_that_holds_everything_once() -> None:
    t = multi_turn_trace(users=4, rounds=3)
    r = simulate_chain(t, _chain(10, t.working_set))
    assert r.tiers[1].written == t.working_set
    assert r.tiers[1].bytes_written == t.working_set * 16 * 128 * 1024


def test_chain_frequency_filter_writes_a_block_on_its_second_offer_only() -> None:
    t = Trace("t", [[1, 2], [1, 2], [3]])
    r = simulate_chain(t, _chain(8, 8, "frequency"))
    # 1 and 2: offered to disk after their first save, refused; re-offered on the second
    # request (the host holds them), admitted. 3: offered once.
    assert r.tiers[1].written == 2 and r.tiers[1].rejected == 3


def test_chain_promotes_a_block_found_below_into_the_first_tier() -> None:
    t = Trace("t", [[1], [2], [3], [1]])
    r = simulate_chain(t, _chain(2, 8))
    # 1 was evicted from the host; the last request finds it on disk and promotes it.
    assert r.tiers[1].hits == 1
    assert r.tiers[0].written == 4


def test_chain_opt_is_one_cache_as_large_as_the_chain() -> None:
    t = multi_turn_trace(users=4, rounds=3)
    r = simulate_chain(t, _chain(10, 30))
    from kvbm_policies.replay import belady

    assert r.opt_hit_rate == belady(t, 40).hit_rate


def test_parse_chain_takes_fractions_and_block_counts() -> None:
    tiers = parse_chain("host:1/16, disk:0.25, s3:5000", 1600)
    assert [(t.name, t.capacity) for t in tiers] == [("host", 100), ("disk", 400), ("s3", 5000)]


@pytest.mark.parametrize("spec", ["", "host", "host:x", "host:1/0"])
def test_parse_chain_bad_spec_shows_an_example(spec: str) -> None:
    with pytest.raises(ValueError, match="host:1/16"):
        parse_chain(spec, 100)


def test_sketch_filter_admits_on_the_second_offer() -> None:
    f = SketchFilter(width=1024)
    assert f.admit([b"a" * 16, b"b" * 16]) == [False, False]
    assert f.admit([b"a" * 16]) == [True]


def test_sketch_filter_forgets_after_its_counts_age() -> None:
    f = SketchFilter(width=1024, sample=4)
    f.admit([b"a" * 16])
    f.admit([b"x" * 16, b"y" * 16, b"z" * 16])  # the fourth offer halves every count
    assert f.admit([b"a" * 16]) == [False]


def test_reuse_filter_admits_a_block_offered_again_within_the_window() -> None:
    f = ReuseWindowFilter(window=3)
    assert f.admit([1, 2, 3, 1]) == [False, False, False, True]


def test_reuse_filter_refuses_a_block_that_left_the_window() -> None:
    f = ReuseWindowFilter(window=2)
    assert f.admit([1, 2, 3, 1]) == [False, False, False, False]
    assert len(f) == 2


@pytest.mark.parametrize(("cls", "options", "words"), [
    (SketchFilter, {"threshold": 16}, "'threshold'"),
    (SketchFilter, {"width": 8}, "'width'"),
    (ReuseWindowFilter, {"window": 0}, "'window'"),
    (ReuseWindowFilter, {"size": 3}, "unknown option 'size'"),
])
def test_new_filters_bad_option_names_it(cls: type, options: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        cls(**options)


def test_simulate_chain_command_prints_each_tiers_hits_and_writes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(["simulate", "--users", "6", "--rounds", "3", "--chain", "host:1/16,disk:1/4",
               "--admission", "all,frequency,reuse"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "host hits" in out and "disk written" in out and "GiB" in out
    assert "lru / frequency" in out and "disk writes" in out


def test_simulate_chain_command_json_has_every_run(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--workload", "agentic", "--param", "sessions=3",
               "--param", "concurrency=2", "--chain", "host:0.1,disk:0.5",
               "--policies", "lru,adaptive", "--admission", "all", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["label"] for r in doc["runs"]] == ["lru / all", "adaptive / all"]
    assert all(len(r["tiers"]) == 2 and 0 < r["of_opt"] <= 1 for r in doc["runs"])


@pytest.mark.skipif(find_mooncake() is None, reason="shared Mooncake trace not present")
def test_chain_replays_mooncake_timestamps_as_the_filters_clock(tmp_path: Path) -> None:
    from kvbm_policies.workloads import load_mooncake

    t = load_mooncake(find_mooncake(), limit=50)  # type: ignore[arg-type]
    assert t.times is not None and t.times[-1] > t.times[0]
    r = simulate_chain(t, _chain(100, 400, "frequency"))
    assert r.accesses == t.accesses


def test_parse_named_reads_options_and_scales_nx_by_the_tier_size() -> None:
    assert parse_named("reuse:window=2x", 300) == ("reuse", {"window": 600})
    assert parse_named("lirs:hir_ratio=0.05", 10) == ("lirs", {"hir_ratio": 0.05})
    assert parse_named("adaptive:candidates=lru", 10) == ("adaptive", {"candidates": "lru"})


def test_parse_named_option_without_a_value_shows_the_form() -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_named("reuse:window", 10)

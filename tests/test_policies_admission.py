"""Admission filters: Dynamo's frequency filter on an injected clock, the priority-prefix
filter, and presence through the manager."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvbm import ContiguousBlocks, KvBlockManager
from kvbm.config import load_settings
from kvbm.errors import ConfigError
from kvbm.manager import resolve_chain
from kvbm.plugins import build_plugins
from kvbm.policy import AdmitAll
from kvbm_policies import FrequencyFilter, PriorityPrefixFilter

from conftest import PAGE, SMALL_MODEL


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_frequency_first_offer_counts_one_and_is_not_admitted(clock: FakeClock) -> None:
    f = FrequencyFilter(clock=clock)
    assert f.admit([b"a"]) == [False]
    assert f.count(b"a") == 1


def test_frequency_each_later_offer_doubles_the_count(clock: FakeClock) -> None:
    f = FrequencyFilter(clock=clock)
    counts = []
    for _ in range(4):
        f.admit([b"a"])
        counts.append(f.count(b"a"))
    assert counts == [1, 2, 4, 8]


def test_frequency_admits_when_the_count_reaches_the_threshold(clock: FakeClock) -> None:
    f = FrequencyFilter(threshold=4, clock=clock)
    assert [f.admit([b"a"])[0] for _ in range(4)] == [False, False, True, True]


def test_frequency_decay_drops_each_count_by_one_per_period(clock: FakeClock) -> None:
    f = FrequencyFilter(period=10, clock=clock)
    for _ in range(3):
        f.admit([b"a"])  # 4
    clock.now += 10
    assert f.count(b"a") == 3
    clock.now += 25  # two more whole periods
    assert f.count(b"a") == 1


def test_frequency_decay_forgets_counts_that_reach_zero(clock: FakeClock) -> None:
    f = FrequencyFilter(period=10, clock=clock)
    f.admit([b"once"])
    clock.now += 10
    assert len(f) == 0
    assert f.admit([b"once"]) == [False], "a forgotten block starts over at 1"


def test_frequency_no_decay_before_a_full_period(clock: FakeClock) -> None:
    f = FrequencyFilter(period=10, clock=clock)
    f.admit([b"a"])
    clock.now += 9.99
    assert f.count(b"a") == 1


def test_frequency_over_the_bound_decays_until_it_fits(clock: FakeClock) -> None:
    f = FrequencyFilter(max_entries=3, period=600, clock=clock)
    f.admit([b"hot"] * 3)  # 4
    f.admit([b"warm"] * 2)  # 2
    f.admit([b"a"])  # 1
    assert len(f) == 3
    f.admit([b"b"])  # four entries: one decay pass drops both ones
    assert len(f) <= 3
    assert f.count(b"hot") == 3 and f.count(b"warm") == 1
    assert f.count(b"a") == 0 and f.count(b"b") == 0


def test_frequency_bound_repeats_decay_as_often_as_needed(clock: FakeClock) -> None:
    f = FrequencyFilter(max_entries=1, clock=clock)
    f.admit([b"x"] * 4)  # 8
    f.admit([b"y"] * 3)  # 4
    assert len(f) == 1 and f.count(b"x") == 4  # four passes to drop y
    assert f.decays == 4


def test_frequency_bound_restarts_the_period(clock: FakeClock) -> None:
    f = FrequencyFilter(max_entries=1, period=10, clock=clock)
    clock.now += 9
    f.admit([b"x"] * 2)  # 2
    f.admit([b"y"])  # over the bound: one pass, y gone, x at 1, period restarts
    clock.now += 9  # 18 s after the start, 9 s after the restart
    assert f.count(b"x") == 1


def test_frequency_defaults_are_dynamos() -> None:
    f = FrequencyFilter()
    assert (f.threshold, f.period, f.max_entries) == (2, 600.0, 1_000_000)


def test_frequency_accepts_strings_from_the_environment() -> None:
    f = FrequencyFilter(threshold="3", period="1.5", max_entries="10")
    assert (f.threshold, f.period, f.max_entries) == (3, 1.5, 10)


@pytest.mark.parametrize(("options", "words"), [
    ({"threshold": 0}, "'threshold'"),
    ({"threshold": "two"}, "'threshold'"),
    ({"period": -5}, "'period'"),
    ({"period": 0}, "'period'"),
    ({"max_entries": 0}, "'max_entries'"),
    ({"decay": 1}, "unknown option 'decay'"),
])
def test_frequency_bad_option_names_the_tier_and_key(
    small_config: dict[str, Any], options: dict[str, Any], words: str
) -> None:
    small_config["tiers"][0].update(admission="frequency", admission_options=options)
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(small_config, plugins=build_plugins())
    msg = str(e.value)
    assert "tier 'host'" in msg and "key 'admission_options'" in msg and words in msg
    assert "\n" not in msg


def test_priority_prefix_stops_at_the_first_block_below_the_threshold() -> None:
    f = PriorityPrefixFilter(min_priority=50)
    assert f.admit([b"a", b"b", b"c", b"d"], [90, 50, 10, 90]) == [True, True, False, False]


def test_priority_prefix_zero_admits_everything() -> None:
    f = PriorityPrefixFilter()
    assert f.admit([b"a", b"b"], [0, 0]) == [True, True]
    assert f.admit([b"a", b"b"]) == [True, True]


def test_priority_prefix_accepts_a_string_threshold() -> None:
    assert PriorityPrefixFilter(min_priority="75").min_priority == 75


@pytest.mark.parametrize("value", [-1, 101, "high", 2.5])
def test_priority_prefix_out_of_range_names_key_and_range(value: Any) -> None:
    with pytest.raises(ValueError, match=r"'min_priority'.*0 to 100"):
        PriorityPrefixFilter(min_priority=value)


def test_priority_prefix_env_variable_sets_the_host_filter(
    small_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "60")
    settings = load_settings(small_config)
    with KvBlockManager.from_config(settings, plugins=build_plugins()) as mgr:
        adm = mgr.chain[0].admission
        assert isinstance(adm, PriorityPrefixFilter) and adm.min_priority == 60


def test_priority_prefix_env_variable_out_of_range_is_a_config_error(
    small_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "250")
    with pytest.raises(ConfigError, match=r"tier 'host': key 'admission_options'.*'min_priority'.*250"):
        KvBlockManager.from_config(load_settings(small_config), plugins=build_plugins())


def _blocks(mgr: KvBlockManager, n: int) -> tuple[list[bytes], ContiguousBlocks]:
    hashes = mgr.hash_tokens(list(range(n * mgr.page_size)))
    src = np.random.default_rng(0).integers(0, 256, (n, mgr.block_bytes), dtype=np.uint8)
    return hashes, ContiguousBlocks(src, mgr.layout)


def test_priority_prefix_offload_skips_the_rest_of_the_request(small_config: dict[str, Any]) -> None:
    small_config["tiers"][0].update(admission="priority_prefix", admission_options={"min_priority": 50})
    with KvBlockManager.from_config(small_config, plugins=build_plugins()) as mgr:
        hashes, src = _blocks(mgr, 4)
        res = mgr.offload(hashes, src, priorities=[90, 90, 10, 90])
        assert (res.stored, res.rejected) == (2, 2)
        assert mgr.match_prefix(hashes).num_blocks == 2


def test_frequency_filter_through_the_manager_admits_on_the_second_offer(small_config: dict[str, Any]) -> None:
    small_config["tiers"][0]["admission"] = "frequency"
    with KvBlockManager.from_config(small_config, plugins=build_plugins()) as mgr:
        hashes, src = _blocks(mgr, 3)
        assert mgr.offload(hashes, src).stored == 0
        assert mgr.offload(hashes, src).stored == 3


def test_presence_a_block_the_tier_holds_is_not_written_again(small_config: dict[str, Any]) -> None:
    # The manager's own check (its registry holds the block, or is writing it) is the
    # presence filter; no admission policy is needed for it.
    with KvBlockManager.from_config(small_config, plugins=build_plugins()) as mgr:
        hashes, src = _blocks(mgr, 3)
        assert mgr.offload(hashes, src).stored == 3
        again = mgr.offload(hashes, src)
        assert (again.stored, again.present) == (0, 3)
        assert mgr.stats()["paths"]["offload:host"]["blocks"] == 3


def _disk_chain(tmp_path: Any) -> dict[str, Any]:
    return {"model": dict(SMALL_MODEL), "page_size": PAGE,
            "tiers": [{"type": "host", "num_blocks": 4},
                      {"type": "disk", "num_blocks": 8, "path": str(tmp_path / "kv")}]}


def test_frequency_is_the_disk_tiers_default_admission(tmp_path: Any) -> None:
    links = resolve_chain(load_settings(_disk_chain(tmp_path)), build_plugins())
    assert isinstance(links[1].admission, FrequencyFilter)


def test_disable_disk_offload_filter_env_turns_the_frequency_filter_off(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "true")
    links = resolve_chain(load_settings(_disk_chain(tmp_path)), build_plugins())
    assert isinstance(links[1].admission, AdmitAll)


def test_unknown_admission_name_names_the_tier_key_and_known_filters(small_config: dict[str, Any]) -> None:
    small_config["tiers"][0]["admission"] = "frequently"
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(small_config, plugins=build_plugins())
    msg = str(e.value)
    assert "tier 'host'" in msg and "key 'admission'" in msg and "'frequently'" in msg
    assert "frequency" in msg and "priority_prefix" in msg

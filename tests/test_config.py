"""Configuration: YAML, KVBM_* and DYN_KVBM_* variables, sizes, two-step validation."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributions import make_distribution, on_sys_path

from kvbm import ConfigError, KvBlockManager, PluginError, load_settings
from kvbm.config import apply_dynamo_env
from kvbm.manager import resolve_chain
from kvbm.plugins import build_plugins
from kvbm.sizes import parse_size

from conftest import SMALL_MODEL


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kvbm.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64GiB", 64 * 2**30), ("100GB", 100 * 10**9), ("512MiB", 512 * 2**20), (4096, 4096), ("1.5KiB", 1536)],
)
def test_sizes_accept_binary_decimal_and_plain_forms(text: object, expected: int) -> None:
    assert parse_size(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["-1GiB", "0", 0, "12 parsecs", True])
def test_sizes_reject_nonpositive_and_unknown_units(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


def test_yaml_file_sets_model_page_size_and_tiers(tmp_path: Path) -> None:
    p = write(tmp_path, "model: {name: m, num_layers: 4, num_kv_heads: 2, head_dim: 64}\n"
                        "page_size: 32\ntiers:\n  - {type: host, capacity: 1GiB, policy: lru}\n")
    s = load_settings(p)
    assert (s.model.num_layers, s.page_size, s.tiers[0].type) == (4, 32, "host")


def test_kvbm_config_variable_names_the_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "page_size: 64\n")
    monkeypatch.setenv("KVBM_CONFIG", str(p))
    assert load_settings().page_size == 64


def test_env_variables_override_yaml_with_nested_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "page_size: 64\nmodel: {num_layers: 4}\n")
    monkeypatch.setenv("KVBM_PAGE_SIZE", "8")
    monkeypatch.setenv("KVBM_MODEL__NUM_LAYERS", "12")
    s = load_settings(p)
    assert (s.page_size, s.model.num_layers) == (8, 12)


def test_dynamo_cpu_cache_gb_is_decimal_gigabytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "2")
    s = load_settings()
    host = [t for t in s.tiers if t.type == "host"][0]
    assert host.model_dump()["capacity"] == 2 * 10**9


def test_dynamo_block_count_override_wins_over_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "2")
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "7")
    links = resolve_chain(load_settings({"model": SMALL_MODEL, "page_size": 4}), build_plugins(), load=False)
    assert links[0].num_blocks == 7


def test_dynamo_disk_variables_add_a_disk_tier_below_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "1")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "10")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", "/tmp/x")
    s = load_settings()
    assert [t.type for t in s.tiers] == ["host", "disk"]
    assert s.tiers[1].model_dump()["path"] == "/tmp/x"


def test_dynamo_disk_cache_gb_alone_is_a_disk_only_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "1.5")
    s = load_settings()
    assert [t.type for t in s.tiers] == ["disk"]  # Dynamo: the device offloads straight to disk
    assert s.tiers[0].model_dump()["capacity"] == 15 * 10**8


def test_disabling_the_disk_filter_reaches_a_disk_tier_another_variable_adds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "true")
    assert [t.type for t in load_settings().tiers] == ["host"]  # a flag adds no tier
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "1")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "10")
    disk = load_settings().tiers[1].model_dump()
    assert disk["admission"] == "all"


def test_dynamo_flag_set_to_false_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "false")
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "1")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "10")
    assert load_settings().tiers[1].model_dump().get("admission") is None


def test_host_prefix_priority_sets_the_filter_and_keeps_other_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "60")
    s = load_settings({"tiers": [{"type": "host", "capacity": "1GiB",
                                  "admission_options": {"keep": 1}}]})
    host = s.tiers[0].model_dump()
    assert host["admission"] == "priority_prefix"
    assert host["admission_options"] == {"keep": 1, "min_priority": "60"}


def test_a_bad_dynamo_value_names_variable_key_and_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "lots")
    with pytest.raises(ConfigError) as e:
        load_settings()
    msg = str(e.value)
    assert "DYN_KVBM_CPU_CACHE_GB='lots'" in msg and "'capacity'" in msg and "'host'" in msg


def test_tiers_are_sorted_by_the_order_their_plugins_declare() -> None:
    s = load_settings({"tiers": [{"type": "disk", "capacity": "1GiB", "path": "/tmp/x"},
                                 {"type": "host", "capacity": "1GiB"}]})
    assert [t.type for t in s.tiers] == ["host", "disk"]


def test_the_default_chain_is_what_the_tier_plugins_declare() -> None:
    assert [t.model_dump(exclude_none=True) for t in load_settings().tiers] == [
        {"type": "host", "capacity": "4GiB"}]
    # Without tier plugins there is no default chain, and resolving says what to give.
    types = build_plugins({"KVBM_DISABLE_PLUGIN_AUTOLOAD": "1"}).tiers
    assert load_settings(tier_types=types).tiers == []


THIRD_PARTY_ENV = '''
from typing import Literal

from kvbm import TierConfig, hookimpl
from kvbm.config import EnvAlias


class TapeConfig(TierConfig):
    type: Literal["tape"] = "tape"
    drive: str = "/dev/st0"


@hookimpl
def kvbm_register_tiers(registry):
    registry.add("tape", factory="kvbm_tiers_host.tier:HostTier", config_model=TapeConfig,
                 order=5, default={"num_blocks": 8},
                 env={"TAPE_DRIVE": EnvAlias("drive"), "TAPE_BLOCKS": EnvAlias("num_blocks", int)})
'''


@pytest.fixture
def tape(tmp_path: Path) -> Iterator[Path]:
    """A third party's tier type that declares an order, a default and two variables."""
    with on_sys_path(tmp_path, "thirdparty_tape") as root:
        make_distribution(root, "kvbm-tape", "thirdparty_tape", "tape", THIRD_PARTY_ENV)
        yield root


def test_a_third_partys_tier_declares_its_variables_order_and_default(
    tape: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [t.type for t in load_settings().tiers] == ["host", "tape"]
    monkeypatch.setenv("TAPE_DRIVE", "/dev/nst1")
    s = load_settings({"tiers": [{"type": "tape"}, {"type": "host", "capacity": "1GiB"}]})
    assert [t.type for t in s.tiers] == ["host", "tape"]
    assert s.tiers[1].model_dump()["drive"] == "/dev/nst1"


def test_one_variable_declared_by_two_tier_types_is_an_error_naming_both(tmp_path: Path) -> None:
    body = THIRD_PARTY_ENV.replace("TAPE_BLOCKS", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS")
    with on_sys_path(tmp_path, "thirdparty_tape") as root:
        make_distribution(root, "kvbm-tape", "thirdparty_tape", "tape", body)
        with pytest.raises(PluginError) as e:
            build_plugins()
    msg = str(e.value)
    assert "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS" in msg and "'host'" in msg and "'tape'" in msg


def test_apply_dynamo_env_takes_the_declarations_it_is_given() -> None:
    types = build_plugins({"KVBM_DISABLE_PLUGIN_AUTOLOAD": "1", "KVBM_PLUGINS": "host"}).tiers
    data = apply_dynamo_env({}, {"DYN_KVBM_DISK_CACHE_GB": "1"}, types)
    assert data["tiers"] == [{"type": "host", "capacity": "4GiB"}]  # no disk plugin: ignored


def test_dynamo_metrics_variables_set_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_METRICS", "true")
    monkeypatch.setenv("DYN_KVBM_METRICS_PORT", "7001")
    s = load_settings()
    assert (s.metrics, s.metrics_port) == (True, 7001)


def test_yaml_syntax_error_is_one_line_with_position(tmp_path: Path) -> None:
    p = write(tmp_path, "tiers: [ {type: host\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    assert "YAML syntax error at line" in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path / "nope.yaml")


def test_skeleton_error_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings({"page_size": -3})
    assert "'page_size'" in str(e.value) and "-3" in str(e.value)


def test_tier_without_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="tiers.0.type"):
        load_settings({"tiers": [{"capacity": "1GiB"}]})


def test_unknown_tier_type_names_tier_and_known_types() -> None:
    s = load_settings({"model": SMALL_MODEL, "tiers": [{"type": "tape", "capacity": "1GiB"}]})
    with pytest.raises(ConfigError) as e:
        KvBlockManager.from_config(s)
    assert "tier 'tape'" in str(e.value) and "'type'" in str(e.value) and "host" in str(e.value)


@pytest.mark.parametrize("cap", ["0", "-5GiB", -1])
def test_zero_or_negative_capacity_names_tier_key_and_value(cap: object) -> None:
    s = load_settings({"model": SMALL_MODEL, "tiers": [{"type": "host", "name": "h0", "capacity": cap}]})
    with pytest.raises(ConfigError) as e:
        resolve_chain(s, build_plugins())
    msg = str(e.value)
    assert "tier 'h0'" in msg and "'capacity'" in msg and str(cap) in msg


def test_unknown_tier_key_is_rejected_by_the_tiers_own_model() -> None:
    s = load_settings({"model": SMALL_MODEL, "tiers": [{"type": "host", "capacity": "1MiB", "colour": "red"}]})
    with pytest.raises(ConfigError, match="tier 'host' \\(type host\\): key 'colour'"):
        resolve_chain(s, build_plugins())


def test_empty_chain_is_rejected() -> None:
    with pytest.raises(ConfigError, match="chain is empty"):
        resolve_chain(load_settings({"tiers": []}), build_plugins())


def test_capacity_smaller_than_one_block_is_rejected() -> None:
    s = load_settings({"tiers": [{"type": "host", "capacity": "1KiB"}]})
    with pytest.raises(ConfigError, match="holds no block"):
        resolve_chain(s, build_plugins())


def test_unknown_eviction_policy_names_tier_and_key() -> None:
    s = load_settings({"model": SMALL_MODEL, "tiers": [{"type": "host", "num_blocks": 4, "policy": "nope"}]})
    with pytest.raises(ConfigError, match="tier 'host': key 'policy': value 'nope'"):
        resolve_chain(s, build_plugins())


def test_lower_tier_smaller_than_upper_warns_what_to_change(caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings({"model": SMALL_MODEL, "tiers": [
        {"type": "host", "name": "big", "num_blocks": 8},
        {"type": "host", "name": "small", "num_blocks": 4}]})
    with caplog.at_level(logging.WARNING, logger="kvbm"):
        resolve_chain(s, build_plugins())
    assert "raise 'small''s capacity to at least 8 blocks" in caplog.text


def test_repeated_tier_types_get_distinct_names() -> None:
    s = load_settings({"model": SMALL_MODEL, "tiers": [
        {"type": "disk", "num_blocks": 4, "path": "/tmp/a"},
        {"type": "disk", "num_blocks": 8, "path": "/tmp/b"}]})
    assert [link.name for link in resolve_chain(s, build_plugins())] == ["disk", "disk1"]


# -- bad input: what is accepted, and what is refused beyond the table ------------------------
@pytest.mark.parametrize("page", [1, 8, 16, 32, 256, 528, 1056])
def test_page_sizes_engines_use_are_accepted(page: int) -> None:
    # Powers of two, and the multiples of 16 vLLM picks for hybrid (Mamba) models.
    assert load_settings({"page_size": page}).page_size == page


def test_kvbm_tiers_sets_the_chain_of_a_dict_config_that_names_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVBM_TIERS", '[{"type": "host", "num_blocks": 7}]')
    s = load_settings({"model": SMALL_MODEL})
    assert [t.model_dump(exclude_none=True) for t in s.tiers] == [{"type": "host", "num_blocks": 7}]


def test_a_dynamo_variable_kvbm_does_not_read_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dynamo's own KVBM reads it; a Dynamo environment must keep working unchanged.
    monkeypatch.setenv("DYN_KVBM_LEADER_ZMQ_HOST", "10.0.0.1")
    assert load_settings().page_size == 16


def test_a_named_second_host_tier_starts_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    s = load_settings({"model": SMALL_MODEL, "tiers": [
        {"type": "host", "num_blocks": 4}, {"type": "host", "name": "slow", "num_blocks": 8}]})
    with caplog.at_level(logging.WARNING, logger="kvbm.host"):
        resolve_chain(s, build_plugins())
    assert "kvbm tier 'slow': a second host tier (after 'host')" in caplog.text


def test_a_host_arena_above_the_memory_available_now_is_refused_before_allocating() -> None:
    from kvbm.machine import memory_available, memory_total

    avail, total = memory_available(), memory_total()
    if total - avail < 256 << 20:
        pytest.skip("almost all memory is available: no size fits between the two")
    cap = (avail + total) // 2
    with pytest.raises(ConfigError, match=r"exceeds the memory available now \("):
        KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": 4,
                                    "tiers": [{"type": "host", "capacity": cap, "touch": False}]})


def test_an_unknown_key_lists_the_known_ones_when_none_is_close() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings({"zzz": 1})
    assert str(e.value).startswith("key 'zzz': unknown key; known keys: background_yield_ms, cache_salt, ")


def test_every_config_error_is_one_line_even_with_several_problems() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings({"page_size": 12, "io_threads": 0, "model": {"num_layers": -1}})
    msg = str(e.value)
    assert "\n" not in msg and msg.count("; key ") == 2

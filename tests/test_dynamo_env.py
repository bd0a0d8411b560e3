"""Dynamo's DYN_KVBM_* variables: each one honoured (the key it sets, the chain its
sizes give) or refused with one WARNING line; docs/dynamo.md lists every one the code
knows. Through load_settings, KvBlockManager.from_config and `kvbm config check`."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import ConfigError, ContiguousBlocks, KvBlockManager, config_env
from kvbm.chain import resolve_chain
from kvbm.cli import main
from kvbm.config import load_settings
from kvbm.config_decl import DYNAMO_KEYS
from kvbm.config_env import REFUSED_DYNAMO, REFUSED_DYNAMO_PREFIXES
from kvbm.plugins import build_plugins

from conftest import PAGE, SMALL_MODEL

DOC = Path(__file__).resolve().parent.parent / "docs" / "dynamo.md"
SMALL = {"model": dict(SMALL_MODEL), "page_size": PAGE}
REFUSED = [*REFUSED_DYNAMO, *(p + "UCX" for p in REFUSED_DYNAMO_PREFIXES)]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees its own once-per-process warnings and no Dynamo variable of ours."""
    monkeypatch.setattr(config_env, "_warned", set())
    for var in list(os.environ):
        if var.startswith(("DYN_KVBM_", "KVBM_")):
            monkeypatch.delenv(var)
    yield


def code_variables() -> set[str]:
    """Every DYN_KVBM_* variable the code reads or refuses (a prefix as PREFIX<NAME>)."""
    declared = {v for d in build_plugins().tiers.declarations() for v in d.env}
    return ({v for v in declared if v.startswith("DYN_KVBM_")} | set(DYNAMO_KEYS.values())
            | set(REFUSED_DYNAMO) | {p + "<NAME>" for p in REFUSED_DYNAMO_PREFIXES})


def table_variables(text: str) -> set[str]:
    return set(re.findall(r"^\| `(DYN_KVBM_[A-Z0-9_<>]+)` \|", text, re.MULTILINE))


def small_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "kvbm.yaml"
    p.write_text(json.dumps(SMALL))  # JSON is YAML: no chain named, the variables name it
    return p


# -- the table ----------------------------------------------------------------------------

def test_the_table_in_docs_lists_every_variable_the_code_knows_and_no_other() -> None:
    text = DOC.read_text()
    assert table_variables(text) == code_variables()
    # Negative control: a row left out is caught.
    dropped = text.replace("| `DYN_KVBM_NCCL_MLA_MODE` |", "| NCCL |")
    assert table_variables(dropped) != code_variables()


def test_the_table_says_refused_exactly_for_the_variables_kvbm_refuses() -> None:
    rows = re.findall(r"^\| `(DYN_KVBM_[A-Z0-9_<>]+)` \|[^|]*\| (\w+)", DOC.read_text(), re.M)
    refused = {v for v, what in rows if what == "refused"}
    assert refused == set(REFUSED_DYNAMO) | {p + "<NAME>" for p in REFUSED_DYNAMO_PREFIXES}
    assert {what for _, what in rows} == {"honoured", "refused"}


# -- the chain the sizes give ---------------------------------------------------------------

def test_disk_cache_gb_alone_gives_a_disk_only_chain_admitting_every_block(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "0.001")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    links = resolve_chain(load_settings(dict(SMALL)), build_plugins())
    assert [(link.config.type, type(link.admission).__name__) for link in links] == [
        ("disk", "AdmitAll")]


def test_disk_block_override_alone_gives_the_disk_only_chain_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "64")
    tiers = [t.model_dump(exclude_none=True) for t in load_settings(dict(SMALL)).tiers]
    assert tiers == [{"type": "disk", "num_blocks": 64, "admission": "all"}]


def test_cpu_and_disk_sizes_give_host_then_disk_behind_the_frequency_filter(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "0.001")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "0.002")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    links = resolve_chain(load_settings(dict(SMALL)), build_plugins())
    assert [(link.config.type, type(link.admission).__name__) for link in links] == [
        ("host", "AdmitAll"), ("disk", "FrequencyFilter")]


def test_cpu_cache_gb_alone_gives_one_host_tier_of_that_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "2")
    tiers = [t.model_dump(exclude_none=True) for t in load_settings(dict(SMALL)).tiers]
    assert tiers == [{"type": "host", "capacity": 2 * 10**9}]


def test_a_chain_the_config_names_keeps_its_tiers_and_gains_the_disk_tier(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "1")
    s = load_settings({**SMALL, "tiers": [{"type": "host", "num_blocks": 4}]})
    assert [(t.type, t.model_dump().get("admission")) for t in s.tiers] == [
        ("host", None), ("disk", None)]  # below a host tier: the disk's own filter


def test_the_disk_only_chain_writes_every_offloaded_block_to_disk_and_reads_it_back(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "16")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    with KvBlockManager.from_config(dict(SMALL)) as m:
        assert [rt.config.type for rt in m.chain] == ["disk"]
        hashes = m.hash_tokens(list(range(4 * PAGE)))
        data = np.random.default_rng(3).integers(0, 256, (4, m.block_bytes), dtype=np.uint8)
        m.offload(hashes, ContiguousBlocks(data, m.layout))  # offered once: no filter
        m.flush()
    assert list(tmp_path.glob("kvbm-*/blocks-*")), "the disk tier made no file"
    with KvBlockManager.from_config(dict(SMALL)) as m:  # a restart: only the disk has them
        out = np.zeros_like(data)
        with m.match_prefix(hashes) as match:
            assert list(match.tiers) == ["disk"] * 4
            res = m.onboard(match, ContiguousBlocks(out, m.layout))
    assert res.loaded == 4 and np.array_equal(out, data)


def test_config_check_shows_the_disk_only_chain(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "0.001")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    assert main(["config", "check", str(small_yaml(tmp_path))]) == 0
    tiers = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tier ")]
    assert len(tiers) == 1 and tiers[0].startswith("tier 0 'disk' (disk)")
    assert tiers[0].endswith("admission AdmitAll")


# -- each honoured variable sets its key ----------------------------------------------------

HONOURED = [
    ("DYN_KVBM_CPU_CACHE_GB", "1.5", "host", "capacity", 15 * 10**8),
    ("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "7", "host", "num_blocks", 7),
    ("DYN_KVBM_DISK_CACHE_GB", "3", "disk", "capacity", 3 * 10**9),
    ("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "9", "disk", "num_blocks", 9),
    ("DYN_KVBM_DISK_CACHE_DIR", "/srv/kv", "disk", "path", ["/srv/kv"]),
    ("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "true", "disk", "zerofill_fallback", True),
    ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "1", "disk", "disable_o_direct", True),
    ("DYN_KVBM_DISK_ALLOCATOR_TYPE", "open-direct", "disk", "allocator_type", "open-direct"),
    ("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "true", "disk", "admission", "all"),
    ("DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY", "40", "host", "admission", "priority_prefix"),
    ("DYN_KVBM_OBJECT_BUCKET", "kv-cache", "s3", "bucket", "kv-cache"),
    ("DYN_KVBM_OBJECT_ENDPOINT", "http://127.0.0.1:9000", "s3", "endpoint_url",
     "http://127.0.0.1:9000"),
    ("DYN_KVBM_OBJECT_REGION", "eu-west-1", "s3", "region", "eu-west-1"),
    ("DYN_KVBM_OBJECT_NUM_BLOCKS", "100", "s3", "num_blocks", 100),
]


@pytest.mark.parametrize("var,value,ttype,key,want", HONOURED, ids=[h[0] for h in HONOURED])
def test_each_honoured_tier_variable_sets_its_key(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        var: str, value: str, ttype: str, key: str, want: Any) -> None:
    chain = [{"type": "host", "num_blocks": 4}, {"type": "disk", "num_blocks": 8}]
    if ttype == "s3":
        chain.append({"type": "s3", "bucket": "other"})
    monkeypatch.setenv(var, value)
    with caplog.at_level(logging.WARNING, logger="kvbm"):
        s = load_settings({**SMALL, "tiers": chain})
    links = resolve_chain(s, build_plugins(), load=False)  # each tier's own model read it
    got = [link.config.model_dump() for link in links if link.config.type == ttype][0]
    assert got[key] == want
    assert not caplog.records, "an honoured variable is not refused"


def test_object_enabled_adds_an_s3_tier_whose_keys_are_never_shown(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DYN_KVBM_OBJECT_ENABLED", "1")
    monkeypatch.setenv("DYN_KVBM_OBJECT_BUCKET", "kv-cache")
    monkeypatch.setenv("DYN_KVBM_OBJECT_ACCESS_KEY", "AKIDSEEN")
    monkeypatch.setenv("DYN_KVBM_OBJECT_SECRET_KEY", "hunter2secret")
    s = load_settings(dict(SMALL))
    assert [t.type for t in s.tiers] == ["host", "s3"]
    assert main(["config", "check", str(small_yaml(tmp_path))]) == 0
    out = capsys.readouterr()
    assert "tier 1 's3' (s3)" in out.out
    assert "hunter2secret" not in out.out + out.err and "AKIDSEEN" not in out.out + out.err


def test_object_enabled_false_adds_no_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_OBJECT_ENABLED", "0")
    monkeypatch.setenv("DYN_KVBM_OBJECT_BUCKET", "kv-cache")
    assert [t.type for t in load_settings(dict(SMALL)).tiers] == ["host"]


def test_a_per_worker_bucket_template_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_OBJECT_ENABLED", "1")
    monkeypatch.setenv("DYN_KVBM_OBJECT_BUCKET", "kv-{worker_id}")
    with pytest.raises(ConfigError, match=r"DYN_KVBM_OBJECT_BUCKET='kv-\{worker_id\}'.*one "
                       "bucket for every worker"):
        load_settings(dict(SMALL))


def test_metrics_variables_set_metrics_and_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_METRICS", "true")
    monkeypatch.setenv("DYN_KVBM_METRICS_PORT", "7002")
    s = load_settings(dict(SMALL))
    assert (s.metrics, s.metrics_port) == (True, 7002)


def test_leader_worker_init_timeout_is_the_trtllm_leaders_wait_for_its_workers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from kvbm_trtllm.connector import DynamoKVBMConnectorLeader

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "num_hidden_layers": 2, "torch_dtype": "float32"}))
    mapping = types.SimpleNamespace(rank=0, tp_rank=0, tp_size=1, world_size=1, pp_size=1,
                                    cp_size=1)
    args = types.SimpleNamespace(
        model=str(tmp_path), attn_backend="TRTLLM",
        kv_cache_config=types.SimpleNamespace(tokens_per_block=16, enable_partial_reuse=False),
        parallel_config=types.SimpleNamespace(to_mapping=lambda: mapping))
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "4")
    monkeypatch.setenv("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "0.25")
    leader = DynamoKVBMConnectorLeader(args)
    waited: list[float | None] = []
    leader.side.poll = lambda timeout=None: waited.append(timeout)  # type: ignore[method-assign]
    leader.wait_for_initialization()  # no worker registered: it waits, then says so
    assert waited == [0.25]


# -- refused variables ---------------------------------------------------------------------

@pytest.mark.parametrize("var", REFUSED)
def test_each_refused_variable_is_one_warning_naming_it_and_its_value_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, var: str) -> None:
    monkeypatch.setenv(var, "true")
    with caplog.at_level(logging.WARNING, logger="kvbm"):
        s = load_settings(dict(SMALL))
        load_settings(dict(SMALL))  # a second load in the same process says nothing more
    lines = [r.getMessage() for r in caplog.records if var in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"kvbm ignores {var}='true': ")
    assert "\n" not in lines[0]
    assert [t.type for t in s.tiers] == ["host"]  # start-up goes on, chain unchanged


def test_config_check_prints_the_refusal_and_succeeds(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DYN_KVBM_NCCL_MLA_MODE", "true")
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "0.001")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)  # what `kvbm`'s logging.basicConfig does in a fresh process
    try:
        assert main(["config", "check", str(small_yaml(tmp_path))]) == 0
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "kvbm ignores DYN_KVBM_NCCL_MLA_MODE='true': each rank loads its own copy" in err


def test_an_unknown_dynamo_variable_is_warned_about_without_its_value(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DYN_KVBM_SOMETHING_NEW", "s3cr3t")
    with caplog.at_level(logging.WARNING, logger="kvbm"):
        load_settings(dict(SMALL))
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("kvbm ignores DYN_KVBM_SOMETHING_NEW (value not shown)") for m in msgs)
    assert not any("s3cr3t" in m for m in msgs)


def test_a_typo_of_a_refused_variable_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_NCCL_MLA_MOD", "true")
    with pytest.raises(ConfigError, match="DYN_KVBM_NCCL_MLA_MOD: .*did you mean "
                       "DYN_KVBM_NCCL_MLA_MODE"):
        load_settings(dict(SMALL))


def test_an_honoured_variable_is_never_refused(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for var in sorted(code_variables() - set(REFUSED_DYNAMO)):
        assert config_env.refusal(var, "1", code_variables()) is None or "<NAME>" in var
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "1")
    with caplog.at_level(logging.WARNING, logger="kvbm"):
        load_settings(dict(SMALL))
    assert not caplog.records


def test_tensorrt_llm_under_a_disk_only_dynamo_environment_reuses_blocks_from_disk(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dynamo's TensorRT-LLM path with only a disk size: the leader's chain is the disk
    tier alone, a repeated prompt loads its complete blocks from it, byte-exact (the
    harness checks every loaded layer's values)."""
    pytest.importorskip("torch")
    import test_trtllm_connector as trt

    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "32")
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path / "dyn"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "num_attention_heads": 4, "num_key_value_heads": trt.HEADS, "head_dim": trt.HEAD,
        "num_hidden_layers": trt.LAYERS, "torch_dtype": "float32"}))
    e = trt.Engine(trt.llm_args(model))
    try:
        planner = e.leader.side.planner
        assert planner is not None
        assert [(ts.cls.__name__, type(ts.admission).__name__) for ts in planner.tiers] == [
            ("DiskTier", "AdmitAll")]
        e.serve(trt.prompt(64))
        b = e.serve(trt.prompt(64))
        assert e.matched[b.request_id] == 48 and e.bad_reads == []
    finally:
        e.close()


def test_every_kvbm_variable_the_code_reads_is_accepted_at_start_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A variable read straight from os.environ (e.g. KVBM_FIO by `kvbm bench`) that the
    # settings check does not know would stop the manager with "reads no such variable".
    root = Path(__file__).resolve().parent.parent
    read = set()
    for f in root.glob("kvbm*/**/*.py"):
        read |= set(re.findall(r"environ(?:\.get\(|\[)\s*\"(KVBM_[A-Z0-9_]+)\"", f.read_text()))
    assert "KVBM_FIO" in read  # the scan finds what it is for
    for var in sorted(read - {"KVBM_CONFIG"}):  # KVBM_CONFIG names a file: tested elsewhere
        monkeypatch.setenv(var, "1" if var != "KVBM_PLUGINS" else "host")
    load_settings(dict(SMALL))

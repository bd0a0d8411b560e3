"""Prometheus metrics: scraped over HTTP from a manager's own endpoint."""

from __future__ import annotations

import json
import re
import socket
import threading
import types
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kvbm import ConfigError, ContiguousBlocks, KvBlockManager, build_plugins
from kvbm.hookspecs import hookimpl
from kvbm_observability import plugin as obs
from kvbm_observability.metrics import dynamo_path_name

from conftest import PAGE, SMALL_MODEL

DASHBOARD = (
    Path(__file__).resolve().parents[1] / "kvbm_observability" / "dashboards" / "kvbm-grafana.json"
)
#: Dynamo KVBM's metric names (its ``prometheus_names::kvbm`` module) and their types.
DYNAMO_NAMES = {
    "offload_blocks_d2h": "counter",
    "offload_blocks_h2d": "counter",
    "offload_blocks_d2d": "counter",
    "offload_blocks_d2o": "counter",
    "onboard_blocks_h2d": "counter",
    "onboard_blocks_d2d": "counter",
    "onboard_blocks_o2d": "counter",
    "offload_bytes_object": "counter",
    "onboard_bytes_object": "counter",
    "matched_tokens": "counter",
    "object_read_failures": "counter",
    "object_write_failures": "counter",
    "host_cache_hit_rate": "gauge",
    "disk_cache_hit_rate": "gauge",
    "object_cache_hit_rate": "gauge",
}


def _manager(tiers: list[dict[str, Any]] | None = None, **kw: Any) -> KvBlockManager:
    cfg = {
        "model": dict(SMALL_MODEL),
        "page_size": PAGE,
        "tiers": tiers or [{"type": "host", "num_blocks": 16}],
        "metrics": True,
        "metrics_port": 0,
        **kw,
    }
    return KvBlockManager.from_config(cfg, plugins=build_plugins(extra_plugins=[obs]))


_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` → value of every sample, under the very name Prometheus stores.

    Read line by line (not with prometheus_client's parser, which renames a counter's
    sample to ``NAME_total`` whatever the endpoint wrote).
    """
    out: dict[str, float] = {}
    for line in scrape_text(url).splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.fullmatch(line)
        assert m is not None, f"not a sample line: {line!r}"
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(_LABEL.findall(m.group(2) or "")))
        out[f"{m.group(1)}{{{labels}}}" if labels else m.group(1)] = float(m.group(3))
    return out


def exposed_types(url: str) -> dict[str, str]:
    """Exposed name → its ``# TYPE``."""
    return {
        ln.split()[2]: ln.split()[3]
        for ln in scrape_text(url).splitlines()
        if ln.startswith("# TYPE ")
    }


def _url(m: KvBlockManager) -> str:
    exp = obs.metrics_exporter(m)
    assert exp is not None
    return exp.url


def _workload(m: KvBlockManager, first_token: int, blocks: int) -> None:
    tokens = list(range(first_token, first_token + blocks * PAGE))
    hashes = m.hash_tokens(tokens)
    src = np.random.default_rng(1).integers(0, 256, (blocks, m.block_bytes), dtype=np.uint8)
    m.offload(hashes, ContiguousBlocks(src, m.layout))
    m.flush()
    with m.match_prefix(tokens) as match:
        dst = np.zeros((match.num_blocks, m.block_bytes), dtype=np.uint8)
        m.onboard(match, ContiguousBlocks(dst, m.layout))


def test_counters_move_between_scrapes_as_blocks_are_offloaded_and_onboarded() -> None:
    m = _manager()
    try:
        before = scrape(_url(m))
        _workload(m, 100, 4)
        after = scrape(_url(m))
    finally:
        m.close()
    assert before["kvbm_offload_blocks_d2h"] == 0 and after["kvbm_offload_blocks_d2h"] == 4
    assert before["kvbm_onboard_blocks_h2d"] == 0 and after["kvbm_onboard_blocks_h2d"] == 4
    assert after["kvbm_matched_tokens"] == 4 * PAGE
    key = (
        'kvbm_transfer_bytes_total{direction="offload",path="offload:host",tier="host",type="host"}'
    )
    assert after[key] == 4 * m.block_bytes
    assert after['kvbm_tier_used_blocks{tier="host",type="host"}'] == 4


def test_counters_move_while_kvbm_bench_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = pytest.importorskip("kvbm_bench.runner")
    pytest.importorskip("torch")
    seen: list[tuple[str, dict[str, float]]] = []
    stop = threading.Event()

    @hookimpl(trylast=True)  # after the endpoint started
    def kvbm_chain_built(manager: KvBlockManager) -> None:
        url = _url(manager)
        seen.append(("start", scrape(url)))

        def poll() -> None:
            while not stop.wait(0.02):
                try:
                    seen.append(("running", scrape(url)))
                except OSError:
                    return  # the endpoint closed with its manager

        threading.Thread(target=poll, daemon=True).start()

    @hookimpl(tryfirst=True)  # before the endpoint stops
    def kvbm_shutdown(manager: KvBlockManager) -> None:
        seen.append(("end", scrape(_url(manager))))

    # A plugin that scrapes each bench manager as it starts, while it runs, and as it closes.
    scraper = types.ModuleType("scrape_at_lifecycle")
    scraper.kvbm_chain_built = kvbm_chain_built  # type: ignore[attr-defined]
    scraper.kvbm_shutdown = kvbm_shutdown  # type: ignore[attr-defined]

    import kvbm.manager

    real = kvbm.manager.build_plugins
    monkeypatch.setattr(kvbm.manager, "build_plugins", lambda: real(extra_plugins=[obs, scraper]))
    config = {
        "model": dict(SMALL_MODEL),
        "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": 256}],
        "metrics": True,
        "metrics_port": 0,
    }
    opts = runner.BenchOptions(
        config=config,
        users=2,
        rounds=3,
        system_tokens=64,
        duration=20,
        raw_blocks=8,
        raw_batch=4,
        progress=False,
    )
    try:
        runner.run_bench(opts)
    finally:
        stop.set()
    starts = [s for tag, s in seen if tag == "start"]
    ends = [s for tag, s in seen if tag == "end"]
    assert starts and ends
    # The first manager is the workload phase: it offloads, matches and onboards.
    assert starts[0]["kvbm_offload_blocks_d2h"] == 0 and ends[0]["kvbm_offload_blocks_d2h"] > 0
    assert starts[0]["kvbm_matched_tokens"] == 0 and ends[0]["kvbm_matched_tokens"] > 0
    assert ends[0]["kvbm_onboard_blocks_h2d"] > 0


def test_host_hit_rate_is_hits_over_lookups() -> None:
    m = _manager()
    try:
        _workload(m, 100, 4)
        # 4 cached blocks then a miss: the walk stops at the first miss (5 lookups).
        with m.match_prefix(list(range(100, 100 + 8 * PAGE))):
            pass
        got = scrape(_url(m))
    finally:
        m.close()
    # The workload's own match: 4 hits in 4 lookups; then 4 hits in 5.
    assert got["kvbm_host_cache_hit_rate"] == pytest.approx(8 / 9)
    assert got['kvbm_tier_lookups_total{tier="host",type="host"}'] == 9


def test_blocks_no_tier_had_a_slot_for_are_counted_as_not_saved() -> None:
    m = _manager(tiers=[{"type": "host", "num_blocks": 4}])
    try:
        _workload(m, 100, 4)
        with m.match_prefix(list(range(100, 100 + 4 * PAGE))):  # every slot pinned
            _workload(m, 9_000, 3)
        got = scrape(_url(m))
    finally:
        m.close()
    assert got["kvbm_blocks_not_saved_total"] == 3
    assert got["kvbm_pinned_blocks"] == 0


def test_evictions_and_usage_are_exported_per_tier() -> None:
    m = _manager(tiers=[{"type": "host", "num_blocks": 4}])
    try:
        _workload(m, 100, 4)
        _workload(m, 9_000, 2)
        got = scrape(_url(m))
    finally:
        m.close()
    assert got['kvbm_evictions_total{tier="host",type="host"}'] == 2
    assert got['kvbm_tier_usage_ratio{tier="host",type="host"}'] == 1.0
    assert got['kvbm_tier_capacity_bytes{tier="host",type="host"}'] == 4 * m.block_bytes


def test_each_manager_serves_its_own_registry_on_its_own_port() -> None:
    a, b = _manager(), _manager()
    try:
        _workload(a, 100, 3)
        ua, ub = _url(a), _url(b)
        assert ua != ub and ua.startswith("http://127.0.0.1:")
        assert scrape(ua)["kvbm_offload_blocks_d2h"] == 3
        assert scrape(ub)["kvbm_offload_blocks_d2h"] == 0
    finally:
        a.close()
        b.close()
    assert REGISTRY.get_sample_value("kvbm_offload_blocks_d2h") is None


def test_dyn_kvbm_metrics_variables_start_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_METRICS", "true")
    monkeypatch.setenv("DYN_KVBM_METRICS_PORT", "0")
    m = KvBlockManager.from_config(
        {
            "model": dict(SMALL_MODEL),
            "page_size": PAGE,
            "tiers": [{"type": "host", "num_blocks": 4}],
        },
        plugins=build_plugins(extra_plugins=[obs]),
    )
    try:
        assert scrape(_url(m))["kvbm_up"] == 1
    finally:
        m.close()


def test_metrics_off_starts_no_endpoint(small_config: dict[str, Any]) -> None:
    m = KvBlockManager.from_config(small_config, plugins=build_plugins(extra_plugins=[obs]))
    try:
        assert obs.metrics_exporter(m) is None
    finally:
        m.close()


def test_closing_the_manager_frees_the_port() -> None:
    m = _manager()
    url = _url(m)
    m.close()
    with pytest.raises(OSError):
        scrape(url)


def test_a_port_in_use_is_an_error_naming_the_setting_and_fix() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        with pytest.raises(ConfigError, match=r"DYN_KVBM_METRICS_PORT.*or 0"):
            _manager(metrics_port=s.getsockname()[1])
    finally:
        s.close()


def test_a_host_disk_chain_counts_host_to_disk_and_disk_to_device(tmp_path: Path) -> None:
    pytest.importorskip("kvbm_tiers_disk.tier")
    tiers = [
        {"type": "host", "num_blocks": 4},
        {"type": "disk", "num_blocks": 16, "path": str(tmp_path), "admission": "all"},
    ]
    m = _manager(tiers=tiers)
    try:
        _workload(m, 100, 4)  # into host, cascaded to disk
        _workload(m, 9_000, 4)  # evicts the first four from host; disk keeps them
        with m.match_prefix(list(range(100, 100 + 4 * PAGE))) as match:
            assert match.tiers == ["disk"] * 4
            dst = np.zeros((4, m.block_bytes), dtype=np.uint8)
            m.onboard(match, ContiguousBlocks(dst, m.layout))
        got = scrape(_url(m))
    finally:
        m.close()
    assert got["kvbm_offload_blocks_h2d"] >= 8
    assert got["kvbm_onboard_blocks_d2d"] == 4
    assert got["kvbm_disk_cache_hit_rate"] > 0


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("offload:host", "offload_blocks_d2h"),
        ("offload:disk", "offload_blocks_h2d"),
        ("offload:s3", "offload_blocks_d2o"),
        ("onboard:host", "onboard_blocks_h2d"),
        ("onboard:disk", "onboard_blocks_d2d"),
        ("onboard:s3", "onboard_blocks_o2d"),
    ],
)
def test_paths_of_a_host_disk_s3_chain_map_to_dynamo_names(path: str, want: str) -> None:
    media = {"host": "CPU", "disk": "DISK", "s3": "OBJECT"}
    assert dynamo_path_name(path, media) == want


def test_offload_into_a_first_disk_tier_is_device_to_disk() -> None:
    assert dynamo_path_name("offload:nvme", {"nvme": "DISK"}) == "offload_blocks_d2d"


def test_dynamo_names_follow_the_declared_medium_not_the_type_name() -> None:
    # A second host-typed tier that declares DISK (as a third party's SSD tier would)
    # counts as host → disk; a medium Dynamo has no name for counts nowhere.
    media = {"fast": "CPU", "ssd": "DISK", "tape": "STORAGE"}
    assert dynamo_path_name("offload:ssd", media) == "offload_blocks_h2d"
    assert dynamo_path_name("onboard:ssd", media) == "onboard_blocks_d2d"
    assert dynamo_path_name("offload:tape", media) is None


def test_dashboard_queries_only_metrics_the_endpoint_declares() -> None:
    # Declared (# TYPE) even with no sample in a host-only chain; that every query
    # returns data is tests/test_prometheus_scrape.py's, against a real Prometheus.
    m = _manager()
    try:
        _workload(m, 100, 2)
        exported = set(exposed_types(_url(m)))
    finally:
        m.close()
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {n for e in exprs for n in re.findall(r"\bkvbm_[a-z0-9_]+", e)}
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"


def test_every_dynamo_kvbm_name_is_exported_bare_with_dynamos_type() -> None:
    m = _manager()
    try:
        url = _url(m)
        got, typed = scrape(url), exposed_types(url)
    finally:
        m.close()
    for name, typ in DYNAMO_NAMES.items():
        assert f"kvbm_{name}" in got, f"kvbm_{name} is not exported"
        assert typed.get(f"kvbm_{name}") == typ, f"kvbm_{name}: {typed.get(f'kvbm_{name}')}"


def test_labelled_counters_end_in_total_and_are_typed_under_that_name() -> None:
    m = _manager()
    try:
        _workload(m, 100, 1)
        url = _url(m)
        got, typed = scrape(url), exposed_types(url)
    finally:
        m.close()
    assert typed["kvbm_transfer_bytes_total"] == "counter"
    assert typed["kvbm_tier_lookups_total"] == "counter"
    assert typed["kvbm_tier_used_blocks"] == "gauge"
    # Every sample is declared: a sample under no # TYPE is untyped to Prometheus.
    assert {k.split("{")[0] for k in got} <= set(typed)


@pytest.fixture(scope="module")
def moto() -> Any:
    pytest.importorskip("kvbm_tiers_s3.tier")
    from s3server import MotoServer

    server = MotoServer()
    server.start()
    yield server
    server.stop()


def test_an_object_tier_counts_dynamos_object_blocks_and_bytes(moto: Any) -> None:
    tiers = [
        {"type": "host", "num_blocks": 4},
        moto.tier_config(prefix="metrics-object", admission="all"),
    ]
    m = _manager(tiers=tiers)
    try:
        _workload(m, 100, 4)  # into host, cascaded to s3
        _workload(m, 9_000, 4)  # evicts the first four from host; s3 keeps them
        with m.match_prefix(list(range(100, 100 + 4 * PAGE))) as match:
            assert match.tiers == ["s3"] * 4
            dst = np.zeros((4, m.block_bytes), dtype=np.uint8)
            m.onboard(match, ContiguousBlocks(dst, m.layout))
        got = scrape(_url(m))
    finally:
        m.close()
    assert got["kvbm_offload_blocks_d2o"] == 8
    assert got["kvbm_offload_bytes_object"] == 8 * m.block_bytes
    assert got["kvbm_onboard_blocks_o2d"] == 4
    assert got["kvbm_onboard_bytes_object"] == 4 * m.block_bytes
    assert got["kvbm_offload_blocks_h2d"] == 0  # an object store is not a disk


def test_counts_a_tier_class_declares_are_counters_and_its_other_numbers_gauges(
    tmp_path: Path,
) -> None:
    pytest.importorskip("nixl._api", reason="the remote tier needs nixl: pip install 'kvbm[remote]'")
    remote = {"type": "remote", "rendezvous_dir": str(tmp_path), "ucx_net_devices": "lo"}
    m = _manager(tiers=[{"type": "host", "num_blocks": 4}, remote])
    try:
        url = _url(m)
        got, typed = scrape(url), exposed_types(url)
    finally:
        m.close()
    lv = 'stat="{}",tier="remote",type="remote"'
    assert typed["kvbm_tier_stat_total"] == "counter"
    assert got["kvbm_tier_stat_total{" + lv.format("bytes_read") + "}"] == 0
    assert got["kvbm_tier_stat{" + lv.format("peers_up") + "}"] == 0
    assert "kvbm_tier_stat{" + lv.format("bytes_read") + "}" not in got


def _run_kvbm(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from kvbm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_kvbm_dashboard_prints_the_dashboard_installed_with_the_package() -> None:
    rc, out, _ = _run_kvbm("dashboard")
    assert rc == 0
    assert json.loads(out) == json.loads(DASHBOARD.read_text())


def test_kvbm_dashboard_out_writes_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "kvbm.json"
    rc, out, _ = _run_kvbm("dashboard", "--out", str(dest))
    assert rc == 0 and str(dest) in out
    assert json.loads(dest.read_text())["title"] == json.loads(DASHBOARD.read_text())["title"]


def test_kvbm_dashboard_into_a_missing_folder_is_one_line_naming_the_path(tmp_path: Path) -> None:
    dest = tmp_path / "missing" / "kvbm.json"
    rc, _, err = _run_kvbm("dashboard", "--out", str(dest))
    assert rc == 2
    assert err.count("\n") == 1 and str(dest) in err and "--out" in err


def _status_config(tmp_path: Path, port: int, events_port: int) -> Path:
    cfg = tmp_path / "kvbm.yaml"
    cfg.write_text(
        "model: {name: tiny, num_layers: 2, num_kv_heads: 2, head_dim: 8, dtype: float16}\n"
        f"page_size: {PAGE}\n"
        "tiers: [{type: host, num_blocks: 16}]\n"
        f"metrics: true\nmetrics_port: {port}\n"
        f"kv_events: {{enabled: true, port: {events_port}}}\n"
    )
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kvbm_status_prints_the_chain_and_the_endpoints_and_says_they_answer(
    tmp_path: Path,
) -> None:
    m = _manager(kv_events={"enabled": True, "port": 0})
    try:
        exp, pub = obs.metrics_exporter(m), obs.kv_event_publisher(m)
        assert exp is not None and pub is not None and pub.port is not None
        cfg = _status_config(tmp_path, exp.port, pub.port)
        rc, out, _ = _run_kvbm("status", str(cfg))
    finally:
        m.close()
    lines = out.splitlines()
    assert lines[0].startswith("chain: host (host, ")
    assert lines[1] == f"metrics: on, {exp.url}: answers (kvbm_up 1.0)"
    assert lines[2].startswith(f"kv events: on, {pub.endpoint} (")
    assert lines[2].endswith(": answers (a ZMQ socket)")
    assert rc == 0


def test_kvbm_status_says_when_the_endpoints_do_not_answer(tmp_path: Path) -> None:
    cfg = _status_config(tmp_path, _free_port(), _free_port())
    rc, out, _ = _run_kvbm("status", str(cfg), "--timeout", "1")
    lines = out.splitlines()
    assert lines[1].startswith("metrics: on, http://127.0.0.1:") and "no answer" in lines[1]
    assert lines[2].startswith("kv events: on, tcp://127.0.0.1:") and "no answer" in lines[2]
    assert rc == 1


def test_kvbm_status_tells_an_http_server_from_a_zmq_socket(tmp_path: Path) -> None:
    # The metrics endpoint where the events should be: it answers, but not as ZMQ.
    m = _manager()
    try:
        exp = obs.metrics_exporter(m)
        assert exp is not None
        cfg = _status_config(tmp_path, _free_port(), exp.port)
        rc, out, _ = _run_kvbm("status", str(cfg), "--timeout", "1")
    finally:
        m.close()
    assert "not as a ZMQ socket" in out.splitlines()[2]
    assert rc == 1


def test_kvbm_status_with_nothing_enabled_says_how_to_enable_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_GB", "1")
    rc, out, _ = _run_kvbm("status")
    assert rc == 0
    assert out.splitlines() == [
        "chain: host (host, 952.00MiB)",  # Dynamo's GB: 10^9 bytes
        "metrics: off (metrics: true or DYN_KVBM_METRICS=true serves "
        "http://127.0.0.1:6880/metrics)",
        "kv events: off (kv_events: {enabled: true} publishes on tcp://127.0.0.1:5557)",
    ]

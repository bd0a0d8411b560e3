"""The shipped dashboard against a real Prometheus scraping two real kvbm endpoints.

Two managers in this process, each with its metrics endpoint on 127.0.0.1: a writer
(host → disk → s3 on a moto server → remote, serving its host tier to peers) and a
reader (host → remote) that onboards the writer's blocks over NIXL. Debian's
``prometheus`` (``make prometheus``) scrapes both every 0.25 s into a temporary
folder; every query of the dashboard then goes to its HTTP API and must return
data. ``promtool check metrics`` reads each endpoint's text. Skipped without
prometheus/promtool, moto or nixl.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import ContiguousBlocks, KvBlockManager, build_plugins
from kvbm_observability import plugin as obs
from kvbm_observability.metrics import DYNAMO_COUNTERS

from conftest import PAGE, SMALL_MODEL

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="prometheus/promtool not installed: `make prometheus` (Debian's prometheus package)",
)
pytest.importorskip("nixl._api", reason="the remote row needs nixl: pip install 'kvbm[remote]'")
pytest.importorskip("kvbm_tiers_s3.tier", reason="the object rows need: pip install 'kvbm[s3]'")
pytest.importorskip("moto", reason="the object rows need moto: pip install 'kvbm[test]'")

from s3server import MotoServer, free_port  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[1] / "kvbm_observability" / "dashboards"
DASHBOARD = DASHBOARD / "kvbm-grafana.json"
#: Grafana's variables: every instance, and a window that covers the whole run.
GRAFANA_VARS = {"$instance": ".*", "$__rate_interval": "1m"}
SCRAPE_MS = 250


def dashboard_queries() -> list[str]:
    """Every target's ``expr`` of the dashboard, Grafana's variables filled in."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for p in panels:
            yield from walk(p.get("panels", []))
            yield from (t["expr"] for t in p.get("targets", []) if t.get("expr"))

    out = []
    for expr in walk(json.loads(DASHBOARD.read_text())["panels"]):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable this test does not fill: {expr}"
        out.append(expr)
    return out


def alternatives(expr: str) -> list[str]:
    """``expr`` once per alternative of each ``label=~"a|b"`` matcher, as ``label="a"``.

    A regex matcher returns data when any one alternative exists; each must exist.
    """
    out = []
    for m in re.finditer(r'(\w+)=~"([^"]*\|[^"]*)"', expr):
        for alt in m.group(2).split("|"):
            out.append(expr[: m.start()] + f'{m.group(1)}="{alt}"' + expr[m.end() :])
    return out


@dataclass
class Stack:
    prometheus: str
    writer: KvBlockManager
    reader: KvBlockManager

    def query(self, q: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scrapes(self) -> int:
        """Samples of ``up`` per target in the last minute, for the less-scraped target."""
        res = self.query("count_over_time(up[1m])")
        return min((int(float(r["value"][1])) for r in res), default=0) if len(res) == 2 else 0

    def wait_scrapes(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.scrapes() < n:
            assert time.monotonic() < deadline, f"prometheus scraped < {n} times in {timeout}s"
            time.sleep(SCRAPE_MS / 1000)


def _url(m: KvBlockManager) -> str:
    exp = obs.metrics_exporter(m)
    assert exp is not None
    return exp.url


def _manager(tiers: list[dict[str, Any]]) -> KvBlockManager:
    cfg = {"model": dict(SMALL_MODEL), "page_size": PAGE, "tiers": tiers, "metrics": True,
           "metrics_port": 0}
    return KvBlockManager.from_config(cfg, plugins=build_plugins(extra_plugins=[obs]))


def _save(m: KvBlockManager, tokens: list[int], seed: int) -> np.ndarray:
    """Offload the blocks of ``tokens`` four at a time (the host tier's size)."""
    hashes = m.hash_tokens(tokens)
    data = np.random.default_rng(seed).integers(
        0, 256, (len(hashes), m.block_bytes), dtype=np.uint8
    )
    src = ContiguousBlocks(data, m.layout)
    for i in range(0, len(hashes), 4):
        m.offload(hashes[i : i + 4], src, indices=list(range(i, min(i + 4, len(hashes)))))
        m.flush()
    return data


def _load(m: KvBlockManager, tokens: list[int]) -> tuple[list[str], np.ndarray]:
    with m.match_prefix(tokens) as match:
        dst = np.zeros((match.num_blocks, m.block_bytes), dtype=np.uint8)
        m.onboard(match, ContiguousBlocks(dst, m.layout))
        return list(match.tiers), dst


def _workload(writer: KvBlockManager, reader: KvBlockManager) -> None:
    """Saves and loads through every tier; loads checked byte for byte."""
    old = list(range(100, 100 + 8 * PAGE))
    new = list(range(50_000, 50_000 + 4 * PAGE))
    old_data = _save(writer, old, 1)
    # Written through: host keeps the new four, disk (8) the last four of old too, s3 all.
    new_data = _save(writer, new, 2)
    time.sleep(0.3)  # the writer's remote tier publishes what its host tier holds
    tiers, got = _load(reader, new)
    assert tiers == ["remote"] * 4
    assert np.array_equal(got, new_data)
    tiers, got = _load(writer, old)
    assert tiers == ["s3"] * 4 + ["disk"] * 4
    assert np.array_equal(got, old_data)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus")
    moto = MotoServer()
    moto.start()
    rdv = str(tmp / "peers")
    remote = {"type": "remote", "rendezvous_dir": rdv, "ucx_net_devices": "lo",
              "publish_interval_s": 0.05, "retry_after_s": 0.2}
    managers: list[KvBlockManager] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        managers.append(_manager([
            {"type": "host", "num_blocks": 4},
            {"type": "disk", "num_blocks": 8, "path": str(tmp / "disk"), "admission": "all"},
            moto.tier_config(prefix="prom", admission="all", num_blocks=64),
            remote,
        ]))
        managers.append(_manager([{"type": "host", "num_blocks": 16}, remote]))
        targets = [_url(m).removeprefix("http://").removesuffix("/metrics") for m in managers]
        (tmp / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": f"{SCRAPE_MS}ms", "scrape_timeout": f"{SCRAPE_MS}ms"},
            "scrape_configs": [{"job_name": "kvbm", "static_configs": [{"targets": targets}]}],
        }))
        port = free_port()
        log = (tmp / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [PROMETHEUS or "prometheus", f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        st = Stack(f"http://127.0.0.1:{port}", managers[0], managers[1])
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{st.prometheus}/-/ready", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "prometheus not ready in 30 s"
                time.sleep(0.1)
        st.wait_scrapes(1)
        _workload(*managers)
        st.wait_scrapes(st.scrapes() + 3)
        yield st
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        for m in managers:
            m.close()
        moto.stop()


def test_promtool_finds_only_dynamos_bare_counter_names_to_lint(stack: Stack) -> None:
    # Dynamo names its counters without _total; promtool's lint says so, and nothing else.
    for m in (stack.writer, stack.reader):
        with urllib.request.urlopen(_url(m), timeout=10) as r:
            text = r.read()
        res = subprocess.run([PROMTOOL or "promtool", "check", "metrics"], input=text,
                             capture_output=True, timeout=30)
        problems = sorted(ln for ln in (res.stdout + res.stderr).decode().splitlines() if ln)
        want = sorted(f'kvbm_{n} counter metrics should have "_total" suffix'
                      for n in DYNAMO_COUNTERS)
        assert problems == want


def test_every_dashboard_query_returns_data_from_prometheus(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    empty = [q for q in queries if not stack.query(q)]
    assert not empty, "queries that return nothing:\n" + "\n".join(empty)


def test_every_alternative_of_a_dashboard_regex_matcher_returns_data(stack: Stack) -> None:
    queries = [a for q in dashboard_queries() for a in alternatives(q)]
    assert queries
    empty = [q for q in queries if not stack.query(q)]
    assert not empty, "alternatives that match nothing:\n" + "\n".join(empty)


def test_a_label_value_that_never_exists_returns_nothing(stack: Stack) -> None:
    # The negative control: the old remote row's checksum series (that count is its own
    # family), and a stat no tier reports, return empty results, which the checks
    # above would report.
    assert stack.query('kvbm_tier_stat{type="remote", stat="checksum_failures"}') == []
    assert stack.query('rate(kvbm_tier_stat_total{stat="no_such_stat"}[1m])') == []
    assert stack.query('kvbm_tier_stat_total{type="remote", stat="bytes_read"}')


def test_rates_over_the_dynamo_counters_see_the_workload(stack: Stack) -> None:
    def total(q: str) -> float:
        return sum(float(r["value"][1]) for r in stack.query(q))

    assert total("increase(kvbm_offload_blocks_d2h[1m])") > 0
    assert total("increase(kvbm_onboard_blocks_o2d[1m])") > 0
    assert total("increase(kvbm_onboard_bytes_object[1m])") > 0
    assert total('increase(kvbm_tier_stat_total{stat="bytes_read"}[1m])') > 0

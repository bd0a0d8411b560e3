"""The s3 tier when its server fails: real moto processes killed and restarted, and a
real HTTP proxy that answers 503 SlowDown or 500, cuts bodies short, or stalls."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from kvbm import ContiguousBlocks, KvBlockManager  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from s3server import SECRET_KEY, Fault, FaultProxy, MotoServer, free_port  # noqa: E402
from test_s3_tier import BB, PAGE, blocks, keys, make_tier  # noqa: E402


class TrickleProxy(FaultProxy):
    """A ``FaultProxy`` that can also trickle: for a ``Fault("trickle", delay_s=...)``
    it sends the whole answer (status line, headers and body) 16 bytes at a time,
    ``delay_s`` apart, so no single socket read ever waits long."""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        f = self.fault
        if f is None or f.kind != "trickle":
            super()._handle(h)
            return
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        fault = self._take(h.command)
        status, reason, rheaders, data = self._forward(h, body)
        raw = f"HTTP/1.1 {status} {reason}\r\n".encode()
        for k, v in rheaders:
            raw += f"{k}: {v}\r\n".encode()
        raw += b"\r\n" + (data if h.command != "HEAD" else b"")
        h.close_connection = True
        if fault is None:
            h.wfile.write(raw)
            return
        for s in range(0, len(raw), 16):
            h.wfile.write(raw[s : s + 16])
            h.wfile.flush()
            time.sleep(fault.delay_s)

MODEL = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16"}


@pytest.fixture
def own_server() -> Iterator[MotoServer]:
    """A server this test may kill and restart."""
    s = MotoServer()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[MotoServer, FaultProxy]]:
    s = MotoServer()
    s.start()
    p = TrickleProxy(s.port)
    yield s, p
    p.close()
    s.stop()


@pytest.fixture
def proxy(proxied: tuple[MotoServer, FaultProxy]) -> Iterator[FaultProxy]:
    p = proxied[1]
    p.set(None)
    yield p
    p.set(None)


def manager(server: MotoServer, model: str) -> KvBlockManager:
    return KvBlockManager.from_config({
        "model": {**MODEL, "name": model}, "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": 4, "touch": False}, server.tier_config()],
    })


def offload_steps(mgr: KvBlockManager, tokens: list[int], data: np.ndarray) -> None:
    hashes = mgr.hash_tokens(tokens)
    src = ContiguousBlocks(data, mgr.layout)
    for s in range(0, len(hashes), 4):
        mgr.offload(hashes[s : s + 4], src, indices=range(s, min(s + 4, len(hashes))))
        mgr.flush()


def test_stopped_server_gives_misses_and_skipped_writes_and_opens_the_breaker(
    own_server: MotoServer, caplog: pytest.LogCaptureFixture,
) -> None:
    mgr = manager(own_server, "down")
    tokens = list(range(8 * PAGE))
    data = blocks(8, 1)
    offload_steps(mgr, tokens[: 4 * PAGE], data[:4])
    own_server.stop()
    offload_steps(mgr, tokens, data)  # blocks 4..7 reach the host tier, not s3
    s3 = mgr.stats()["tiers"]["s3"]
    assert s3["failed_writes"] == 4
    with mgr.match_prefix(tokens) as m:
        assert m.tiers[:4] == ["s3"] * 4  # evicted from host; the s3 registry still lists them
        out = np.zeros_like(data)
        assert mgr.onboard(m, ContiguousBlocks(out, mgr.layout)).loaded == 0
    s3 = mgr.stats()["tiers"]["s3"]
    assert s3["failed_reads"] == 4
    assert s3["breaker_state"] == "open" and s3["breaker_opens"] >= 1 and s3["refused"] >= 1
    assert "circuit breaker open" in caplog.text and SECRET_KEY not in caplog.text
    mgr.close()


def test_service_resumes_after_the_server_restarts_on_the_same_port(own_server: MotoServer) -> None:
    mgr = manager(own_server, "restart")
    data = blocks(8, 2)
    own_server.stop()
    offload_steps(mgr, list(range(4 * PAGE)), data[:4])
    assert mgr.stats()["tiers"]["s3"]["breaker_state"] == "open"
    own_server.start()  # same port; moto keeps nothing, so the bucket is made again
    time.sleep(0.5)  # past the breaker's cool-down (0.2 s, at most 0.4 s)
    mgr.match_prefix(list(range(1000, 1000 + PAGE))).release()  # its probe is the trial
    assert mgr.stats()["tiers"]["s3"]["breaker_state"] == "closed"
    tokens = list(range(5000, 5000 + 8 * PAGE))
    offload_steps(mgr, tokens, data)
    assert mgr.stats()["tiers"]["s3"]["puts"] == 8
    with mgr.match_prefix(tokens) as m:
        out = np.zeros_like(data)
        assert mgr.onboard(m, ContiguousBlocks(out, mgr.layout)).loaded == 8
    assert np.array_equal(out, data)
    mgr.close()


def test_server_down_at_start_starts_with_the_breaker_open() -> None:
    dead = MotoServer(port=free_port())  # never started
    tier = make_tier(dead, "dead", connect_timeout_s=0.2)
    assert tier.stats()["breaker_state"] == "open"
    assert tier.read([0], keys(1, 3), [np.zeros(BB, np.uint8)]) == [False]
    assert tier.write([0], keys(1, 3), list(blocks(1, 3))) == [False]
    assert tier.probe(keys(2, 3)) == [False, False]
    tier.close()


def test_slowdown_answers_are_retried_and_the_write_succeeds(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    tier = make_tier(proxied[0], "slowdown", proxy.url, retries=2)
    proxy.set(Fault("slowdown", ("PUT",), count=1))
    data, ks = blocks(1, 4), keys(1, 4)
    assert tier.write([0], ks, list(data)) == [True]
    st = tier.stats()
    assert proxy.faulted == 1 and st["retries"] == 1 and st["puts"] == 1
    out = np.zeros_like(data)
    assert tier.read([0], ks, list(out)) == [True] and np.array_equal(out, data)
    tier.close()


def test_persistent_server_errors_skip_the_write_with_a_counter(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    tier = make_tier(proxied[0], "error500", proxy.url, retries=1, breaker_failures=100)
    proxy.set(Fault("error500", ("PUT",)))
    assert tier.write(range(2), keys(2, 5), list(blocks(2, 5))) == [False, False]
    st = tier.stats()
    assert st["put_failures"] == 2 and st["transient_errors"] == 4 and st["puts"] == 0
    tier.close()


def test_body_cut_short_once_is_retried_and_read(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    tier = make_tier(proxied[0], "truncate-once", proxy.url, retries=1)
    data, ks = blocks(1, 6), keys(1, 6)
    tier.write([0], ks, list(data))
    proxy.set(Fault("truncate", ("GET",), count=1))
    out = np.zeros_like(data)
    assert tier.read([0], ks, list(out)) == [True] and np.array_equal(out, data)
    assert tier.stats()["truncated"] == 1
    tier.close()


def test_body_cut_short_on_every_attempt_is_a_miss(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    tier = make_tier(proxied[0], "truncate-always", proxy.url, retries=1)
    data, ks = blocks(1, 7), keys(1, 7)
    tier.write([0], ks, list(data))
    proxy.set(Fault("truncate", ("GET",)))
    assert tier.read([0], ks, [np.zeros(BB, np.uint8)]) == [False]
    st = tier.stats()
    assert st["truncated"] == 2 and st["get_failures"] == 1
    tier.close()


def test_stalled_server_times_out_as_a_miss(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    tier = make_tier(proxied[0], "stall", proxy.url, retries=0, read_timeout_s=0.3)
    data, ks = blocks(1, 8), keys(1, 8)
    tier.write([0], ks, list(data))
    proxy.set(Fault("delay", ("GET",), delay_s=1.0))
    assert tier.read([0], ks, [np.zeros(BB, np.uint8)]) == [False]
    assert tier.stats()["timeouts"] == 1
    tier.close()


def test_trickling_server_read_is_cut_at_the_request_deadline(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    # Each 16-byte piece comes 0.05 s after the last: well inside read_timeout_s (2 s),
    # so only the deadline ends the GET, long before the ~15 s the answer would take.
    tier = make_tier(proxied[0], "trickle-get", proxy.url, retries=1, request_deadline_s=0.5)
    data, ks = blocks(1, 9), keys(1, 9)
    assert tier.write([0], ks, list(data)) == [True]
    proxy.set(Fault("trickle", ("GET",), delay_s=0.05))
    t0 = time.monotonic()
    assert tier.read([0], ks, [np.zeros(BB, np.uint8)]) == [False]
    assert time.monotonic() - t0 < 5.0
    st = tier.stats()
    assert st["deadline_enforced"] and st["deadline_exceeded"] == 1 and st["timeouts"] == 1
    assert st["get_failures"] == 1 and proxy.faulted == 1  # the budget was spent: no retry
    proxy.set(None)
    out = np.zeros_like(data)
    assert tier.read([0], ks, list(out)) == [True] and np.array_equal(out, data)
    tier.close()


def test_trickling_server_write_is_skipped_at_the_deadline_and_opens_the_breaker(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    # A cool-down far past the test's length: the breaker, opened inside the write, must
    # still read "open" at the check on a slow machine (0.2 s had run out once in CI).
    tier = make_tier(proxied[0], "trickle-put", proxy.url, retries=0, request_deadline_s=0.3,
                     breaker_failures=1, breaker_cooldown_s=30.0, breaker_max_cooldown_s=30.0)
    proxy.set(Fault("trickle", ("PUT",), delay_s=0.05))  # the answer's headers trickle
    assert tier.write([0], keys(1, 10), list(blocks(1, 10))) == [False]
    st = tier.stats()
    assert st["deadline_exceeded"] == 1 and st["put_failures"] == 1 and st["puts"] == 0
    assert st["breaker_state"] == "open" and st["breaker_opens"] == 1
    tier.close()


def test_batch_after_a_successful_half_open_trial_proceeds_normally(
    proxied: tuple[MotoServer, FaultProxy], proxy: FaultProxy,
) -> None:
    tier = make_tier(proxied[0], "half-open", proxy.url, retries=0, breaker_failures=1)
    data, ks = blocks(4, 11), keys(4, 11)
    assert tier.write(range(4), ks, list(data)) == [True] * 4
    proxy.set(Fault("error500", ("GET",), count=1))
    assert tier.read([0], ks[:1], [np.zeros(BB, np.uint8)]) == [False]
    assert tier.stats()["breaker_state"] == "open"
    time.sleep(0.25)  # past the 0.2 s cool-down
    # The trial is held for 0.5 s: the batch's other reads ask while it is in flight.
    proxy.set(Fault("delay", ("GET",), count=1, delay_s=0.5))
    out = np.zeros_like(data)
    first = tier.read(range(4), ks, list(out))
    assert first.count(True) == 1 and tier.stats()["refused"] == 3
    assert tier.stats()["breaker_state"] == "closed"
    out = np.zeros_like(data)
    assert tier.read(range(4), ks, list(out)) == [True] * 4
    assert np.array_equal(out, data) and tier.stats()["refused"] == 3
    tier.close()

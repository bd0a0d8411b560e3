"""A hung S3 server never holds an engine call past its deadline.

The server is a real moto server on 127.0.0.1 stopped with SIGSTOP: the kernel still
accepts connections and takes requests into its buffers, but nothing answers, as a
wedged or swapped-out store would. Each engine call is timed against the deadline
that bounds it:

- ``offload`` into a host tier with room: the host copy only (the cascade is behind);
- ``offload`` that overflows into the s3 tier: ``request_deadline_s``;
- ``match_prefix`` + ``onboard`` of blocks only the bucket holds: ``probe_timeout_s``
  for the probe and ``read_deadline_s`` for the read, then the open circuit breaker
  answers at once;
- ``close()``: ``close_timeout_s`` for the cascade, then the tiers close (the s3 tier
  waits for requests in flight, at most their deadline and one breaker trial);
- ``from_config``: ``read_deadline_s`` for the bucket check.

``SLACK`` covers a slow CI machine's scheduling, not the server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from s3server import MotoServer  # noqa: E402

from kvbm import ContiguousBlocks, KvBlockManager  # noqa: E402

from conftest import PAGE, SMALL_MODEL  # noqa: E402

READ_DEADLINE_S = 0.5
REQUEST_DEADLINE_S = 3.0
PROBE_TIMEOUT_S = 0.3
CLOSE_TIMEOUT_S = 1.0
SLACK = 1.0


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    s = MotoServer()
    s.start()
    yield s
    s.stop()


class Stopped:
    """SIGSTOP the server for the ``with`` block; SIGCONT after, whatever happens."""

    def __init__(self, server: MotoServer) -> None:
        assert server.proc is not None
        self.pid = server.proc.pid

    def __enter__(self) -> Stopped:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


def config(server: MotoServer, prefix: str, host_blocks: int = 16) -> dict[str, Any]:
    s3 = server.tier_config(name="s3", prefix=prefix, retries=1,
                            read_deadline_s=READ_DEADLINE_S, request_deadline_s=REQUEST_DEADLINE_S)
    # Long socket timeouts: only the deadlines may end a request to a stopped server.
    s3.update(connect_timeout_s=30.0, read_timeout_s=60.0, breaker_failures=3)
    return {"model": SMALL_MODEL, "page_size": PAGE, "probe_timeout_s": PROBE_TIMEOUT_S,
            "close_timeout_s": CLOSE_TIMEOUT_S,
            "tiers": [{"type": "host", "num_blocks": host_blocks}, s3]}


def engine(mgr: KvBlockManager, n: int = 16) -> ContiguousBlocks:
    rng = np.random.default_rng(7)
    return ContiguousBlocks(rng.integers(0, 255, (n, mgr.block_bytes), dtype=np.uint8),
                            mgr.layout)


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def test_offload_into_a_host_tier_with_room_never_waits_on_a_stopped_server(
    server: MotoServer,
) -> None:
    mgr = KvBlockManager.from_config(config(server, "room"))
    try:
        eng = engine(mgr)
        hashes = mgr.hash_tokens(list(range(8 * PAGE)))
        with Stopped(server):
            took, res = timed(lambda: mgr.offload(hashes, eng))
            assert res.stored == 8
            assert took < 0.5, f"offload took {took:.2f}s with the server stopped"
    finally:
        mgr.close()


def test_offload_overflowing_into_a_stopped_server_waits_at_most_request_deadline_s(
    server: MotoServer,
) -> None:
    mgr = KvBlockManager.from_config(config(server, "overflow", host_blocks=4))
    try:
        eng = engine(mgr)
        hashes = mgr.hash_tokens(list(range(8 * PAGE)))
        with Stopped(server):
            took, res = timed(lambda: mgr.offload(hashes, eng))
            # The host holds 4; the other 4 are written to s3 in the caller's thread.
            assert res.stored == 4 and res.failed == 4
            assert took < REQUEST_DEADLINE_S + SLACK, f"offload took {took:.2f}s"
    finally:
        mgr.close()


def test_match_and_onboard_from_a_stopped_server_take_at_most_the_probe_and_read_deadlines(
    server: MotoServer,
) -> None:
    mgr = KvBlockManager.from_config(config(server, "onboard", host_blocks=4))
    try:
        eng = engine(mgr)
        hashes = mgr.hash_tokens(list(range(8 * PAGE)))
        mgr.offload(hashes[:4], eng)
        assert mgr.flush(10)  # the first 4 reach the bucket
        mgr.offload(hashes[4:], eng, indices=[4, 5, 6, 7])  # and leave the host for these
        assert mgr.flush(10)

        def match_and_onboard() -> tuple[list[str], int]:
            with mgr.match_prefix(hashes) as m:
                got = mgr.onboard(m, eng, indices=list(range(m.num_blocks)))
                return m.tiers, got.loaded

        with Stopped(server):
            took, (tiers, loaded) = timed(match_and_onboard)
            assert tiers[:4] == ["s3"] * 4 and loaded == 0  # the bucket's blocks miss now
            assert took < PROBE_TIMEOUT_S + READ_DEADLINE_S + SLACK, f"took {took:.2f}s"
            # The breaker is open now: the next call does not wait at all.
            again, _ = timed(match_and_onboard)
            assert again < 0.5, f"a second match+onboard took {again:.2f}s"
    finally:
        mgr.close()


def _close_after_offload(server: MotoServer, prefix: str) -> float:
    mgr = KvBlockManager.from_config(config(server, prefix))
    eng = engine(mgr)
    hashes = mgr.hash_tokens(list(range(8 * PAGE)))
    with Stopped(server):
        mgr.offload(hashes, eng)  # the cascade to s3 is now stuck on the server
        took, _ = timed(mgr.close)
    return took


def test_close_with_a_stopped_server_returns_within_its_cascade_and_request_deadlines(
    server: MotoServer,
) -> None:
    took = _close_after_offload(server, "close")
    # close waits close_timeout_s for the cascade; the s3 tier then waits for its PUTs
    # in flight (cut at their deadline, together, opening the breaker) and for at most
    # one half-open trial after them.
    assert took < CLOSE_TIMEOUT_S + 2 * REQUEST_DEADLINE_S + SLACK, f"close took {took:.2f}s"


def test_close_with_a_stopped_server_returns_within_close_timeout_s(server: MotoServer) -> None:
    took = _close_after_offload(server, "close-now")
    assert took < CLOSE_TIMEOUT_S + SLACK, f"close took {took:.2f}s"


def test_from_config_with_a_stopped_server_returns_within_read_deadline_s(
    server: MotoServer,
) -> None:
    with Stopped(server):
        took, mgr = timed(lambda: KvBlockManager.from_config(config(server, "start")))
        try:
            assert mgr.chain[1].tier.stats()["breaker_opens"] == 1
        finally:
            mgr.close()
    assert took < READ_DEADLINE_S + SLACK, f"from_config took {took:.2f}s"


def test_requests_hung_together_open_the_breaker_before_another_is_sent(
    server: MotoServer,
) -> None:
    mgr = KvBlockManager.from_config(config(server, "together"))
    try:
        s3 = mgr.chain[1].tier
        keys = mgr.hash_tokens(list(range(8 * PAGE)))
        data = [np.full(mgr.block_bytes, i, np.uint8) for i in range(8)]
        assert s3.write(list(range(8)), keys, data) == [True] * 8
        before = s3.stats()
        with Stopped(server):
            # 8 GETs on 4 threads: the first 4 hang until read_deadline_s cuts them all at
            # once; those 4 failures must open the breaker (breaker_failures 3) before a
            # freed thread sends the 5th.
            out = [np.zeros(mgr.block_bytes, np.uint8) for _ in range(8)]
            assert s3.read(list(range(8)), keys, out) == [False] * 8
            after = s3.stats()
        assert after["deadline_exceeded"] - before["deadline_exceeded"] == 4
        assert after["refused"] - before["refused"] == 4
    finally:
        mgr.close()

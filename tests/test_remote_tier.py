"""The remote tier: a peer's host tier read over NIXL (UCX on loopback).

Two-process tests start this file as a script (``serve`` mode): the child builds a
manager with a host tier and a serving remote tier, offloads known blocks, prints
``READY <addr>`` and serves until its stdin closes (or it is killed). All traffic
stays on 127.0.0.1 (``UCX_NET_DEVICES=lo``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")

from kvbm import ContiguousBlocks, KvBlockManager  # noqa: E402
from kvbm.config import KvbmSettings  # noqa: E402
from kvbm.errors import ConfigError  # noqa: E402
from kvbm.plugins import build_plugins  # noqa: E402

TINY = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float32"}
# 256 KiB blocks, so that a batch takes long enough to be killed mid-transfer.
BIG = {"name": "big", "num_layers": 4, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
PAGE = 16
FAST = {"ucx_net_devices": "lo", "publish_interval_s": 0.05, "retry_after_s": 0.2,
        "request_timeout_s": 2.0, "transfer_timeout_s": 5.0}


def _config(model: dict[str, Any], remote: dict[str, Any], host_blocks: int = 256) -> dict[str, Any]:
    return {"model": model, "page_size": PAGE,
            "tiers": [{"type": "host", "num_blocks": host_blocks},
                      {"type": "remote", **FAST, **remote}]}


def _blocks(n: int, seed: int, block_bytes: int) -> tuple[list[int], np.ndarray]:
    """The tokens and block bytes a child offloads: the same in both processes."""
    tokens = [seed * 1_000_003 + i for i in range(n * PAGE)]
    data = np.random.default_rng(seed).integers(0, 256, (n, block_bytes), dtype=np.uint8)
    return tokens, data


def _serve(args: dict[str, Any]) -> None:
    """Child: offload ``n`` known blocks and serve them until stdin closes."""
    mgr = KvBlockManager.from_config(_config(args["model"], args["remote"]))
    tokens, data = _blocks(args["n"], args["seed"], mgr.block_bytes)
    mgr.offload(mgr.hash_tokens(tokens), ContiguousBlocks(data, mgr.layout))
    mgr.flush()
    time.sleep(0.2)  # let the publisher write the served hashes
    remote = mgr.chain[-1].tier
    print("READY", remote.identity.addr, flush=True)
    sys.stdin.readline()
    mgr.close()


class Child:
    """A serving kvbm process; ``ready()`` waits for its ``READY`` line."""

    def __init__(self, model: dict[str, Any], remote: dict[str, Any], n: int, seed: int) -> None:
        env = dict(os.environ, UCX_NET_DEVICES="lo")
        arg = json.dumps({"model": model, "remote": remote, "n": n, "seed": seed})
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve", arg], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env,
        )
        self.addr = ""

    def ready(self) -> Child:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:  # NIXL logs to stdout too: skip to our line
            line = raw.split()
            if line and line[0] == "READY":
                self.addr = line[1]
                return self
        self.proc.kill()
        raise RuntimeError(f"child did not start (exit {self.proc.wait()})")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _onboard(mgr: KvBlockManager, tokens: list[int], n: int) -> tuple[list[str], int, np.ndarray]:
    out = np.zeros((n, mgr.block_bytes), dtype=np.uint8)
    with mgr.match_prefix(tokens) as m:
        tiers = list(m.tiers)
        res = mgr.onboard(m, ContiguousBlocks(out[: m.num_blocks], mgr.layout), promote=False)
    return tiers, res.loaded, out


def _remote(mgr: KvBlockManager) -> Any:
    return mgr.chain[-1].tier


@pytest.fixture
def rdir(tmp_path: Path) -> str:
    return str(tmp_path / "rendezvous")


@dataclass
class Children:
    """Serving processes started together (their start-up dominates these tests)."""

    base: Path
    reader_port: int
    shared: Child  # TINY, 12 blocks, seed 1; in base/shared and listing reader_port as a peer
    doomed: Child  # BIG, 96 blocks, seed 3; in base/kill
    first: Child  # TINY, 4 blocks, seed 4, instance 'peer-a'; in base/restart


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("remote")
    reader_port = _free_port()
    procs = Children(
        base, reader_port,
        Child(TINY, {"rendezvous_dir": str(base / "shared"), "listen": f"127.0.0.1:{_free_port()}",
                     "peers": [f"127.0.0.1:{reader_port}"]}, n=12, seed=1),
        Child(BIG, {"rendezvous_dir": str(base / "kill")}, n=96, seed=3),
        Child(TINY, {"rendezvous_dir": str(base / "restart"), "instance_id": "peer-a"}, n=4, seed=4),
    )
    try:
        for c in (procs.shared, procs.doomed, procs.first):
            c.ready()
        yield procs
    finally:
        for c in (procs.shared, procs.doomed, procs.first):
            c.kill()


# -- two processes ---------------------------------------------------------------
def test_blocks_offloaded_by_one_process_are_onboarded_byte_exact_by_another(
    children: Children,
) -> None:
    cfg = _config(TINY, {"rendezvous_dir": str(children.base / "shared")})
    with KvBlockManager.from_config(cfg) as mgr:
        tokens, data = _blocks(12, 1, mgr.block_bytes)
        tiers, loaded, out = _onboard(mgr, tokens, 12)
        assert tiers == ["remote"] * 12
        assert loaded == 12
        assert np.array_equal(out, data)


def test_peer_list_rendezvous_serves_configured_addresses(children: Children) -> None:
    cfg = _config(TINY, {"listen": f"127.0.0.1:{children.reader_port}",
                         "peers": [children.shared.addr]})
    with KvBlockManager.from_config(cfg) as mgr:
        tokens, data = _blocks(12, 1, mgr.block_bytes)
        tiers, loaded, out = _onboard(mgr, tokens, 12)
        assert (tiers, loaded) == (["remote"] * 12, 12)
        assert np.array_equal(out, data)


def test_peer_list_rendezvous_refuses_an_unlisted_reader(children: Children) -> None:
    cfg = _config(TINY, {"peers": [children.shared.addr]})  # listens on a port the child does not list
    with KvBlockManager.from_config(cfg) as mgr:
        tokens, _ = _blocks(12, 1, mgr.block_bytes)
        tiers, loaded, _ = _onboard(mgr, tokens, 12)
        assert (tiers, loaded) == ([], 0)
        assert _remote(mgr).peers()[0]["up"] is False


def test_peer_killed_mid_transfer_gives_misses_and_the_reader_carries_on(
    children: Children,
) -> None:
    n = 96  # 24 MiB per onboard
    errors: list[BaseException] = []
    results: list[tuple[int, bool]] = []
    stop = threading.Event()
    cfg = _config(BIG, {"rendezvous_dir": str(children.base / "kill")}, 8)
    with KvBlockManager.from_config(cfg) as mgr:
        tokens, data = _blocks(n, 3, mgr.block_bytes)

        def loop() -> None:
            while not stop.is_set():
                try:
                    _, loaded, out = _onboard(mgr, tokens, n)
                    results.append((loaded, bool(np.array_equal(out[:loaded], data[:loaded]))))
                except BaseException as e:  # the test fails on any
                    errors.append(e)
                    return

        t = threading.Thread(target=loop)
        t.start()
        try:
            deadline = time.monotonic() + 20
            while len(results) < 3 and time.monotonic() < deadline and t.is_alive():
                time.sleep(0.005)
            children.doomed.kill()  # SIGKILL while the loop keeps onboarding
            n_before = len(results)
            time.sleep(1.0)
        finally:
            stop.set()
            t.join(timeout=20)
        assert not errors, errors
        assert results[0][0] == n
        assert all(exact for _, exact in results), "a loaded block differed from the peer's"
        assert len(results) > n_before, "the reader stopped after the peer died"
        assert results[-1][0] == 0
        assert _remote(mgr).stats()["peer_drops"] >= 1


def test_killed_peer_file_is_ignored_once_its_heartbeat_is_stale(children: Children) -> None:
    children.doomed.kill()  # idempotent: the test above may have killed it already
    rdir = str(children.base / "kill")
    (leftover,) = Path(rdir).rglob("*.kvbm-peer")  # a SIGKILL leaves the file behind
    stale_s = 8 * FAST["publish_interval_s"]  # the default stale_intervals, the peer's interval
    time.sleep(max(0.0, leftover.stat().st_mtime + stale_s + 0.1 - time.time()))
    with KvBlockManager.from_config(_config(BIG, {"rendezvous_dir": rdir}, 8)) as mgr:
        tokens, _ = _blocks(4, 3, mgr.block_bytes)
        assert _onboard(mgr, tokens, 4)[:2] == ([], 0)
        assert _remote(mgr).peers() == []
        assert _remote(mgr).stats()["peer_drops"] == 0  # no connect was even tried
    # Without the heartbeat check, the same file costs a failed connect.
    trusting = {"rendezvous_dir": rdir, "stale_intervals": 10**9}
    with KvBlockManager.from_config(_config(BIG, trusting, 8)) as mgr:
        tokens, _ = _blocks(4, 3, mgr.block_bytes)
        _onboard(mgr, tokens, 4)
        assert len(_remote(mgr).peers()) == 1
        assert _remote(mgr).stats()["peer_drops"] >= 1


def test_restarted_peer_is_read_again(children: Children) -> None:
    remote = {"rendezvous_dir": str(children.base / "restart"), "instance_id": "peer-a"}
    second: Child | None = None
    try:
        with KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": remote["rendezvous_dir"]})) as mgr:
            tokens, data = _blocks(4, 4, mgr.block_bytes)
            assert _onboard(mgr, tokens, 4)[1] == 4
            children.first.kill()
            assert _onboard(mgr, tokens, 4)[1] == 0
            second = Child(TINY, remote, n=4, seed=4).ready()
            deadline = time.monotonic() + 10
            loaded, out = 0, np.zeros(0)
            while loaded < 4 and time.monotonic() < deadline:
                _, loaded, out = _onboard(mgr, tokens, 4)
                time.sleep(0.05)
            assert loaded == 4
            assert np.array_equal(out, data)
    finally:
        if second is not None:
            second.kill()


# -- one process, two managers -------------------------------------------------------
@pytest.fixture
def pair(rdir: str) -> Any:
    a = KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": rdir}))
    yield a, b
    a.close()
    b.close()


def _offload(mgr: KvBlockManager, n: int, seed: int) -> tuple[list[int], np.ndarray]:
    tokens, data = _blocks(n, seed, mgr.block_bytes)
    mgr.offload(mgr.hash_tokens(tokens), ContiguousBlocks(data, mgr.layout))
    mgr.flush()
    time.sleep(0.2)
    return tokens, data


def test_batch_of_more_steps_than_the_lease_window_is_read_byte_exact_and_released(
    rdir: str,
) -> None:
    # 4 KiB blocks, READs of one block and leases of three: 40 blocks take 14 leased
    # steps, more than the requests kept in flight, so the window slides many times.
    small = {"rendezvous_dir": rdir, "pipeline_bytes": 3 * 4096, "verify_bytes": 4096}
    a = KvBlockManager.from_config(_config(TINY, small))
    b = KvBlockManager.from_config(_config(TINY, small))
    try:
        assert a.block_bytes == 4096
        tokens, data = _offload(a, 40, 11)
        tiers, loaded, out = _onboard(b, tokens, 40)
        assert tiers == ["remote"] * 40
        assert loaded == 40
        assert np.array_equal(out, data)
        server = _remote(a)._server
        deadline = time.monotonic() + 2.0
        while server.active_leases and time.monotonic() < deadline:
            time.sleep(0.01)  # releases are one-way: the peer may not have read them yet
        assert server.active_leases == 0
    finally:
        a.close()
        b.close()


def test_checksum_mismatch_is_a_miss_not_data(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    tokens, _ = _offload(a, 3, 5)
    server = _remote(a)._server
    real = server._lease

    def lying_lease(cid: int, keys: list[bytes], ttl: float) -> dict[str, Any]:
        reply = real(cid, keys, ttl)
        reply["blocks"] = [[addr, (s + 1) & (2**64 - 1)] for addr, s in reply["blocks"]]
        return reply

    monkeypatch.setattr(server, "_lease", lying_lease)
    tiers, loaded, _ = _onboard(b, tokens, 3)
    assert tiers == ["remote"] * 3
    assert loaded == 0
    assert _remote(b).stats()["checksum_failures"] == 3


def test_read_over_a_transport_that_needs_the_peers_progress_asks_for_it(
    rdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # UCX over TCP alone emulates a READ with messages the serving side must progress;
    # its poller runs only after a reader's hello and when asked, so a READ long after
    # the hello completes only because the reader sends "pump".
    monkeypatch.setenv("UCX_TLS", "tcp")
    a = KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": rdir}))
    try:
        tokens, data = _offload(a, 3, 15)
        assert all(_remote(b).probe(b.hash_tokens(tokens)))  # connects: hello
        time.sleep(1.3)  # the poller the hello started has stopped
        t0 = time.monotonic()
        _, loaded, out = _onboard(b, tokens, 3)
        assert loaded == 3
        assert np.array_equal(out, data)
        assert time.monotonic() - t0 < FAST["transfer_timeout_s"]
    finally:
        a.close()
        b.close()


@pytest.fixture
def lease_pair(rdir: str) -> Any:
    a = KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": rdir, "verify": "lease"}))
    yield a, b
    a.close()
    b.close()


def _lie_about(server: Any, monkeypatch: pytest.MonkeyPatch, **fields: Any) -> None:
    """Make the serving side's lease replies carry wrong checksums and ``fields``."""
    real = server._lease

    def lying_lease(cid: int, keys: list[bytes], ttl: float) -> dict[str, Any]:
        reply = real(cid, keys, ttl)
        reply["blocks"] = [[addr, (s + 1) & (2**64 - 1)] for addr, s in reply["blocks"]]
        reply.update(fields)
        return reply

    monkeypatch.setattr(server, "_lease", lying_lease)


def test_verify_lease_trusts_a_block_read_while_its_lease_pinned_it_without_hashing(
    lease_pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = lease_pair
    tokens, data = _offload(a, 3, 12)
    _lie_about(_remote(a)._server, monkeypatch)  # sums are wrong: only a hash would notice
    _, loaded, out = _onboard(b, tokens, 3)
    assert loaded == 3
    assert np.array_equal(out, data)
    assert _remote(b).stats()["checksum_failures"] == 0


def test_verify_lease_block_whose_read_outlasted_its_lease_is_a_miss(
    lease_pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = lease_pair
    tokens, _ = _offload(a, 3, 13)
    # A lease this short has lapsed before any READ can end: the peer may have reused
    # the slots, so nothing read under it is data.
    _lie_about(_remote(a)._server, monkeypatch, ttl=1e-6)
    _, loaded, _ = _onboard(b, tokens, 3)
    assert loaded == 0
    assert _remote(b).stats()["lease_overruns"] == 3


def test_verify_lease_falls_back_to_checksums_when_the_peer_gives_no_ttl(
    lease_pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = lease_pair
    tokens, _ = _offload(a, 2, 14)
    _lie_about(_remote(a)._server, monkeypatch, ttl=None)
    _, loaded, _ = _onboard(b, tokens, 2)
    assert loaded == 0
    assert _remote(b).stats()["checksum_failures"] == 2


def test_block_rewritten_under_the_same_key_is_a_miss_then_read_anew(pair: Any) -> None:
    a, b = pair
    tokens, data = _offload(a, 2, 9)
    assert _onboard(b, tokens, 2)[1] == 2  # the peer now remembers both checksums
    host = a.chain[0]
    slot = host.registry.lookup(a.hash_tokens(tokens)[1])
    host.tier.slots[slot] ^= 0xFF  # new bytes under the same key, as a re-offload may write
    assert _onboard(b, tokens, 2)[1] == 1
    assert _remote(b).stats()["checksum_failures"] == 1
    time.sleep(0.3)  # the reader forgets the failed block; the peer forgets its sum
    _, loaded, out = _onboard(b, tokens, 2)
    assert loaded == 2
    assert np.array_equal(out[1], data[1] ^ 0xFF)


def test_block_the_peer_evicted_is_a_miss_and_forgotten(pair: Any) -> None:
    a, b = pair
    tokens, _ = _offload(a, 3, 6)
    with b.match_prefix(tokens) as m:
        assert m.tiers == ["remote"] * 3
        a.release_all_evictable()  # the peer drops its copies after b matched them
        out = np.zeros((3, b.block_bytes), dtype=np.uint8)
        assert b.onboard(m, ContiguousBlocks(out, b.layout)).loaded == 0
    time.sleep(0.2)
    with b.match_prefix(tokens) as m:
        assert m.num_blocks == 0
    assert _remote(b).stats()["lease_misses"] == 3


def test_peer_file_heartbeat_is_rewritten_while_its_keys_are_unchanged(pair: Any) -> None:
    import msgpack

    a, _ = pair
    path = _remote(a)._file()
    first = msgpack.unpackb(path.read_bytes())["heartbeat"]
    time.sleep(4 * FAST["publish_interval_s"])
    assert msgpack.unpackb(path.read_bytes())["heartbeat"] > first


def test_clean_shutdown_removes_the_peer_file(rdir: str) -> None:
    mgr = KvBlockManager.from_config(_config(TINY, {"rendezvous_dir": rdir}))
    path = _remote(mgr)._file()
    assert path.exists()
    mgr.close()
    assert not path.exists()


def test_remote_tier_takes_no_offloads(pair: Any) -> None:
    a, _ = pair
    _offload(a, 4, 7)
    st = a.stats()["tiers"]["remote"]
    assert (st["used_blocks"], st["failed_writes"], st["skipped_writes"]) == (0, 0, 0)


# -- the serving side, spoken to over a raw socket ----------------------------------------
def _ask(addr: str, msg: dict[str, Any], sock: socket.socket | None = None) -> dict[str, Any]:
    from kvbm_tiers_remote.protocol import recv_msg, send_msg, split_addr

    s = sock or socket.create_connection(split_addr(addr), timeout=5)
    send_msg(s, msg)
    reply = recv_msg(s)
    if sock is None:
        s.close()
    return reply


@pytest.fixture
def server() -> Any:
    cfg = _config(TINY, {"peers": ["127.0.0.1:1"], "lease_timeout_s": 0.3})
    mgr = KvBlockManager.from_config(cfg)
    tokens, _ = _blocks(2, 8, mgr.block_bytes)
    hashes = mgr.hash_tokens(tokens)
    mgr.offload(hashes, ContiguousBlocks(_blocks(2, 8, mgr.block_bytes)[1], mgr.layout))
    yield mgr, hashes
    mgr.close()


def _pins(mgr: KvBlockManager, hashes: list[bytes]) -> list[int]:
    """Leases held on each block's slot in the served host arena."""
    served = mgr.executor.served[0]
    return [served.pins_at(served.lookup(h)) for h in hashes]  # type: ignore[arg-type]


def test_lease_pins_blocks_until_its_timeout(server: Any) -> None:
    mgr, hashes = server
    addr = _remote(mgr).identity.addr
    with socket.create_connection(("127.0.0.1", int(addr.split(":")[1]))) as s:
        reply = _ask(addr, {"op": "lease", "from_id": "x", "from_addr": "127.0.0.1:1",
                            "keys": hashes, "ttl": 0.3}, s)
        assert reply["ok"] and all(b is not None for b in reply["blocks"])
        assert _pins(mgr, hashes) == [1, 1]
        time.sleep(1.2)  # the reader never releases: the lease times out
        assert _pins(mgr, hashes) == [0, 0]
        assert _remote(mgr).stats()["expired_leases"] == 1


def test_lease_of_a_reader_whose_connection_closes_is_released(server: Any) -> None:
    mgr, hashes = server
    addr = _remote(mgr).identity.addr
    s = socket.create_connection(("127.0.0.1", int(addr.split(":")[1])))
    _ask(addr, {"op": "lease", "from_id": "x", "from_addr": "127.0.0.1:1", "keys": hashes,
                "ttl": 60}, s)
    assert _pins(mgr, hashes) == [1, 1]
    s.close()
    deadline = time.monotonic() + 5
    while _pins(mgr, hashes) != [0, 0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _pins(mgr, hashes) == [0, 0]


def test_unconfigured_peer_is_refused(server: Any) -> None:
    mgr, hashes = server
    reply = _ask(_remote(mgr).identity.addr,
                 {"op": "lease", "from_id": "y", "from_addr": "127.0.0.1:2", "keys": hashes})
    assert not reply["ok"]
    assert "127.0.0.1:2" in reply["error"]
    assert _pins(mgr, hashes) == [0, 0]


# -- config and plugin -----------------------------------------------------------------
def test_remote_tier_without_rendezvous_is_a_config_error() -> None:
    cfg = {"model": TINY, "page_size": PAGE,
           "tiers": [{"type": "host", "num_blocks": 4}, {"type": "remote"}]}
    with pytest.raises(ConfigError, match="rendezvous_dir"):
        KvBlockManager.from_config(cfg)


def _above_host(write_through: bool) -> KvbmSettings:
    # Settings built directly keep their order (a dict or YAML chain is sorted, which
    # puts known remote tiers last; a third-party tier type still sorts after them).
    settings = KvbmSettings(
        model=TINY, page_size=PAGE, write_through=write_through,
        tiers=[{"type": "host", "num_blocks": 8},
               {"type": "remote", "name": "peers", "peers": ["127.0.0.1:1"], **FAST},
               {"type": "host", "name": "spare", "num_blocks": 8}],
    )
    assert [t.name for t in settings.tiers][1:] == ["peers", "spare"]
    return settings


def test_remote_tier_above_another_tier_in_a_write_through_chain_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"tier 'peers'.*'spare'.*move 'peers' to the end"):
        KvBlockManager.from_config(_above_host(True))


def test_remote_tier_above_another_tier_without_write_through_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="kvbm.remote"):
        KvBlockManager.from_config(_above_host(False)).close()
    assert "move 'peers' to the end of 'tiers'" in caplog.text


def test_remote_tier_is_registered_with_its_extra() -> None:
    entry = build_plugins().tiers.get("remote")
    assert entry.extra == "remote"
    assert "nixl" in entry.requires
    assert entry.available


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "serve":
    _serve(json.loads(sys.argv[2]))

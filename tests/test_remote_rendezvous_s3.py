"""The remote tier's S3 rendezvous: peers publish their records under an S3 prefix.

A real moto S3 server runs on 127.0.0.1 (``s3server.MotoServer``), and a real HTTP
proxy in front of it (``s3server.FaultProxy``) plays S3 outages. Serving peers are
child processes started by ``test_remote_tier.Child`` (the same script mode), which
find each other and the test's reader through the bucket and move the blocks over
NIXL (UCX on loopback).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("boto3", reason="boto3 is not installed: pip install 'kvbm[s3]'")
pytest.importorskip("moto.server", reason="moto is not installed: pip install 'moto[server]'")

import msgpack  # noqa: E402

from kvbm import KvBlockManager  # noqa: E402
from kvbm.errors import ConfigError, PluginError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from s3server import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, Fault, FaultProxy, MotoServer  # noqa: E402
from test_remote_tier import TINY, Child, _blocks, _config, _onboard, _remote  # noqa: E402

#: Publish every 0.2 s (a record is stale after 8 of them: 1.6 s). Faster would load
#: the moto server of a busy test machine with PUTs and LISTs.
INTERVAL = 0.2


def _s3(endpoint: str, prefix: str) -> dict[str, Any]:
    return {"bucket": BUCKET, "prefix": prefix, "endpoint_url": endpoint, "region": REGION,
            "addressing_style": "path", "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY, "connect_timeout_s": 0.5,
            "read_timeout_s": 1.0}


def _remote_cfg(endpoint: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"rendezvous_s3": _s3(endpoint, prefix), "publish_interval_s": INTERVAL, **extra}


class World:
    """The moto server and the serving children every test of this file shares."""

    def __init__(self, moto: MotoServer) -> None:
        self.moto = moto
        self.client = moto.client()
        # TINY, 12 blocks, seed 1, in prefix 'shared'
        self.shared = Child(TINY, _remote_cfg(moto.url, "shared"), n=12, seed=1)
        # TINY, 4 blocks, seed 2, in prefix 'kill' (the stale-record test kills it)
        self.doomed = Child(TINY, _remote_cfg(moto.url, "kill"), n=4, seed=2)

    def records(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Key -> decoded peer record of every object under ``prefix``."""
        out = {}
        for obj in self.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", []):
            body = self.client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = msgpack.unpackb(body)
        return out


@pytest.fixture(scope="module")
def world() -> Any:
    moto = MotoServer()
    moto.start()
    w = World(moto)
    try:
        w.shared.ready()
        w.doomed.ready()
        yield w
    finally:
        w.shared.kill()
        w.doomed.kill()
        moto.stop()


@pytest.fixture
def proxy(world: World) -> Any:
    p = FaultProxy(world.moto.port)
    yield p
    p.close()


# -- discovery and reading -------------------------------------------------------------
def test_processes_find_each_other_through_the_s3_prefix_and_read_byte_exact(world: World) -> None:
    with KvBlockManager.from_config(_config(TINY, _remote_cfg(world.moto.url, "shared"))) as mgr:
        tokens, data = _blocks(12, 1, mgr.block_bytes)
        tiers, loaded, out = _onboard(mgr, tokens, 12)
        assert tiers == ["remote"] * 12
        assert loaded == 12
        assert np.array_equal(out, data)
        # The child served this reader only because its record is in the prefix.
        mine = f"/{_remote(mgr).instance_id}.kvbm-peer"
        assert any(k.endswith(mine) for k in world.records("shared"))


def test_reader_that_does_not_publish_in_the_prefix_is_refused(world: World) -> None:
    cfg = _config(TINY, _remote_cfg(world.moto.url, "shared", serve=False))
    with KvBlockManager.from_config(cfg) as mgr:
        tokens, _ = _blocks(12, 1, mgr.block_bytes)
        # The child's published hashes match, but it refuses to lease them to this reader.
        assert _onboard(mgr, tokens, 12)[1] == 0
        (peer,) = _remote(mgr).peers()
        assert peer["up"] is False
        assert peer["failures"] >= 1


def test_unchanged_record_is_not_downloaded_again(world: World, proxy: FaultProxy) -> None:
    # A copy of the child's record under another prefix, with a heartbeat that stays
    # fresh for a minute: nobody rewrites it while the reader lists.
    (record,) = world.records("shared").values()
    record.update(heartbeat=time.time(), interval_s=10.0)
    key = f"still/{record['namespace']}/static.kvbm-peer"
    world.client.put_object(Bucket=BUCKET, Key=key, Body=msgpack.packb(record))
    cfg = _config(TINY, _remote_cfg(proxy.url, "still", serve=False))
    with KvBlockManager.from_config(cfg) as mgr:
        remote = _remote(mgr)
        proxy.set(Fault("delay", methods=("GET",)))  # counts GETs, delays none
        for _ in range(3):
            remote._scan_dir(force=True)
        assert [p["id"] for p in remote.peers()] == ["static"]
        assert proxy.faulted == 3 + 1  # three LISTs (GET requests too), one GET of the record
        record["heartbeat"] = time.time()
        world.client.put_object(Bucket=BUCKET, Key=key, Body=msgpack.packb(record))
        remote._scan_dir(force=True)
        assert proxy.faulted == 3 + 1 + 2  # a new ETag: listed and fetched again


def test_killed_peer_record_is_ignored_once_its_heartbeat_is_stale(world: World) -> None:
    world.doomed.kill()  # SIGKILL: the record stays in the bucket
    (record,) = world.records("kill").values()
    time.sleep(max(0.0, record["heartbeat"] + 8 * INTERVAL + 0.1 - time.time()))
    cfg = _config(TINY, _remote_cfg(world.moto.url, "kill", serve=False))
    with KvBlockManager.from_config(cfg) as mgr:
        tokens, _ = _blocks(4, 2, mgr.block_bytes)
        assert _onboard(mgr, tokens, 4)[:2] == ([], 0)
        assert _remote(mgr).peers() == []
        assert _remote(mgr).stats()["peer_drops"] == 0  # no connect was even tried


def test_clean_shutdown_deletes_the_own_object(world: World) -> None:
    mgr = KvBlockManager.from_config(_config(TINY, _remote_cfg(world.moto.url, "own")))
    name = f"/{_remote(mgr).instance_id}.kvbm-peer"
    assert [k for k in world.records("own") if k.endswith(name)]
    mgr.close()
    assert world.records("own") == {}


def test_publish_after_unpublish_does_not_bring_the_record_back(world: World) -> None:
    # A publisher thread still running when the instance shuts down must not recreate
    # the object the shutdown deleted.
    mgr = KvBlockManager.from_config(_config(TINY, _remote_cfg(world.moto.url, "late")))
    rdv = _remote(mgr)._rdv
    try:
        rdv.unpublish()
        assert rdv.publish(b"late") is False
        assert world.records("late") == {}
    finally:
        mgr.close()


# -- S3 failures -------------------------------------------------------------------------
def test_s3_outage_keeps_the_known_peers_and_raises_nothing(
    world: World, proxy: FaultProxy, caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = _config(TINY, _remote_cfg(proxy.url, "shared"))
    with KvBlockManager.from_config(cfg) as mgr, caplog.at_level("WARNING", "kvbm.remote"):
        tokens, data = _blocks(12, 1, mgr.block_bytes)
        assert _onboard(mgr, tokens, 12)[1] == 12
        proxy.set(Fault("error500"))  # every S3 request fails from now on
        deadline = time.monotonic() + 5
        while "listing at s3://" not in caplog.text and time.monotonic() < deadline:
            _onboard(mgr, tokens, 12)  # each probe may start a listing, which fails
            time.sleep(INTERVAL / 2)
        assert "listing at s3://" in caplog.text
        _, loaded, out = _onboard(mgr, tokens, 12)
        assert loaded == 12
        assert np.array_equal(out, data)
        assert [p["up"] for p in _remote(mgr).peers()] == [True]
        assert caplog.text.count("listing at s3://") == 1  # once per outage, not per scan
        proxy.set(None)  # so that closing deletes the reader's record


def test_s3_down_at_start_gives_misses_then_peers_once_it_answers(
    world: World, proxy: FaultProxy,
) -> None:
    proxy.set(Fault("error500"))
    with KvBlockManager.from_config(_config(TINY, _remote_cfg(proxy.url, "shared"))) as mgr:
        tokens, data = _blocks(12, 1, mgr.block_bytes)
        assert _onboard(mgr, tokens, 12)[:2] == ([], 0)
        proxy.set(None)
        deadline = time.monotonic() + 10
        loaded, out = 0, np.zeros(0)
        while loaded < 12 and time.monotonic() < deadline:
            _, loaded, out = _onboard(mgr, tokens, 12)
            time.sleep(INTERVAL / 2)
        assert loaded == 12
        assert np.array_equal(out, data)


# -- config ------------------------------------------------------------------------------
def test_rendezvous_dir_and_s3_together_is_a_config_error_naming_both(tmp_path: Path) -> None:
    remote = {"rendezvous_dir": str(tmp_path), "rendezvous_s3": {"bucket": BUCKET}}
    with pytest.raises(ConfigError, match=r"'rendezvous_dir' and 'rendezvous_s3'.*keep one"):
        KvBlockManager.from_config(_config(TINY, remote))


def test_peers_beside_rendezvous_s3_is_accepted() -> None:
    from kvbm_tiers_remote.config import RemoteTierConfig

    cfg = RemoteTierConfig(peers=["127.0.0.1:7101"], rendezvous_s3={"bucket": BUCKET})
    assert cfg.rendezvous_s3 is not None and cfg.peers == ["127.0.0.1:7101"]
    assert cfg.publish_interval_s == 1.0  # S3's default: each publish is a billed PUT


def test_rendezvous_s3_secret_is_not_printed() -> None:
    from kvbm_tiers_remote.config import RemoteTierConfig

    cfg = RemoteTierConfig(rendezvous_s3=_s3("http://127.0.0.1:1", "p"))
    assert SECRET_KEY not in repr(cfg) and SECRET_KEY not in str(cfg.model_dump())


def test_rendezvous_s3_without_boto3_fails_at_start_with_the_pip_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # what a missing package looks like
    with pytest.raises(PluginError, match=r"'rendezvous_s3' needs boto3.*pip install 'kvbm\[s3\]'"):
        KvBlockManager.from_config(_config(TINY, _remote_cfg("http://127.0.0.1:1", "p")))


def test_s3_failures_are_logged_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    from kvbm_tiers_remote.rendezvous import _Outage

    outage = _Outage("remote", "s3://b/p")
    with caplog.at_level(logging.INFO, "kvbm.remote"):
        for _ in range(3):
            outage.failed("listing", OSError("down"))
        outage.ok("listing")
        outage.failed("listing", OSError("down again"))
    assert caplog.text.count("WARNING") == 2
    assert caplog.text.count("works again") == 1

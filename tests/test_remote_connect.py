"""The remote tier connects every read lane to a peer when it finds the peer
(``connect_ahead``, ``kvbm_tiers_remote/_connect.py``), on a thread of its own, so a
user's first read does not wait for UCX's wire-up; a connect that fails leaves the
first READ to connect, as before. Real NIXL over UCX on loopback, two managers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")

from nixl._api import nixl_agent  # noqa: E402
from remote_pair import config as _config  # noqa: E402
from remote_pair import offload as _offload  # noqa: E402
from remote_pair import onboard as _onboard  # noqa: E402

from kvbm import KvBlockManager  # noqa: E402


def _record_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Every ``make_connection`` any agent makes: (id of the agent, the peer agent)."""
    calls: list[tuple[int, str]] = []
    real = nixl_agent.make_connection

    def record(self: Any, remote_agent: str, backends: list[str] = []) -> None:  # noqa: B006
        calls.append((id(self), remote_agent))
        real(self, remote_agent, backends)

    monkeypatch.setattr(nixl_agent, "make_connection", record)
    return calls


def _peer_agent(tier: Any) -> Any:
    """The one peer's agent name, as this tier's agent loaded it."""
    (peer,) = tier._peer_set._peers.values()
    return peer.agent


def _lane_agents(tier: Any) -> set[int]:
    lanes = tier._reader._lanes
    lanes._warm.join(30)
    return {id(tier._agent), *(id(lane.agent) for lane in lanes._extra or ())}


@pytest.mark.parametrize("ahead", [True, False], ids=["connect-ahead", "control-off"])
def test_every_read_lane_is_connected_to_a_found_peer_before_the_first_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead: bool
) -> None:
    calls = _record_connections(monkeypatch)
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "read_threads": 3,
                                            "connect_ahead": ahead}))
    try:
        tokens, data = _offload(a, 6, 51)
        tier = b.chain[-1].tier
        lanes = _lane_agents(tier)
        assert len(lanes) == 3
        if ahead:
            assert tier._connector.idle(30)
        else:
            tier._scan_dir(force=True)
            tier._peer_set.live()  # the peer loaded (no READ), as a probe would
        peer_agent = _peer_agent(tier)
        if ahead:
            assert tier._connector.connected == {peer_agent: 3}
        before = {agent for agent, to in calls if to == peer_agent}
        assert tier.stats()["blocks_read"] == 0  # no READ so far
        # The control (connect_ahead: false): no lane connected before a READ.
        assert before == (lanes if ahead else set())
        loaded, out = _onboard(b, tokens, 6)
        assert loaded == 6
        assert np.array_equal(out, data)
    finally:
        a.close()
        b.close()


def test_a_connect_that_fails_leaves_reads_byte_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Any, remote_agent: str, backends: list[str] = []) -> None:  # noqa: B006
        raise RuntimeError("make_connection refused (test)")

    monkeypatch.setattr(nixl_agent, "make_connection", refuse)
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "read_threads": 2,
                                            "verify_bytes": 4096}))
    try:
        tokens, data = _offload(a, 8, 52)
        tier = b.chain[-1].tier
        assert tier._connector.idle(30)
        assert tier._connector.failures >= 1 and tier._connector.connected == {}
        for _ in range(2):
            loaded, out = _onboard(b, tokens, 8)
            assert loaded == 8
            assert np.array_equal(out, data)
        st = tier.stats()
        assert st["transfer_errors"] == 0 and st["peer_drops"] == 0
    finally:
        a.close()
        b.close()


def test_a_peer_published_after_the_reader_started_is_connected_when_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_connections(monkeypatch)
    rdir = str(tmp_path / "rendezvous")
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "read_threads": 2}))
    a = None
    try:
        tier = b.chain[-1].tier
        assert tier._connector.idle(30)
        assert tier._connector.connected == {}  # nobody published yet
        a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
        tokens, data = _offload(a, 4, 53)
        tier._scan_dir(force=True)  # what a probe does once the interval is due
        assert tier._connector.idle(30)
        peer_agent = _peer_agent(tier)
        assert tier._connector.connected == {peer_agent: 2}
        assert {agent for agent, to in calls if to == peer_agent} == _lane_agents(tier)
        loaded, out = _onboard(b, tokens, 4)
        assert loaded == 4
        assert np.array_equal(out, data)
    finally:
        if a is not None:
            a.close()
        b.close()

"""The remote tier loads published peers' NIXL agents off the probe's path.

A probe of a peer published in a ``rendezvous_dir`` reads only its published hashes;
loading the peer's agent (``add_remote_agent``) happens on the tier's connect thread:
at the tier's start for the peers listed then, and queued by a probe for a peer not
loaded yet. The first read waits for the load; a load that fails makes the probe's
hits misses, never data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")

from remote_pair import config as _config  # noqa: E402
from remote_pair import offload as _offload  # noqa: E402

from kvbm import KvBlockManager  # noqa: E402

SLOW_S = 1.0


def _up(mgr: KvBlockManager) -> bool:
    return any(p["up"] for p in mgr.chain[-1].tier.peers())


def test_a_peer_published_before_the_tier_starts_is_loaded_without_a_probe(tmp_path: Path) -> None:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    b = None
    try:
        _offload(a, 2, 51)
        b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
        deadline = time.monotonic() + 10
        while not _up(b) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _up(b), "the tier's start loaded the published peer"
        assert b.chain[-1].tier.stats_r.probes == 0
    finally:
        if b is not None:
            b.close()
        a.close()


def _slowed(tier: Any, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[float]:
    """Make loading a peer into ``tier``'s own agent take ``SLOW_S`` (and then fail);
    returns the list the loads' start times go to."""
    real = tier._agent.add_remote_agent
    starts: list[float] = []

    def slow(metadata: bytes) -> Any:
        starts.append(time.monotonic())
        time.sleep(SLOW_S)
        if fail:
            raise RuntimeError("no agent today")
        return real(metadata)

    monkeypatch.setattr(tier._agent, "add_remote_agent", slow)
    return starts


def test_a_probe_does_not_wait_for_a_peers_agent_to_load_and_the_read_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rdir = str(tmp_path / "rendezvous")
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))  # lists none at start
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    try:
        tier = b.chain[-1].tier
        starts = _slowed(tier, monkeypatch)
        tokens, data = _offload(a, 4, 52)
        keys = b.hash_tokens(tokens)
        t0 = time.monotonic()
        assert tier.probe(keys) == [True] * 4
        assert time.monotonic() - t0 < SLOW_S / 2, "the probe waited for the agent's load"
        out = np.zeros_like(data)
        assert tier.read(list(range(4)), keys, list(out)) == [True] * 4
        assert np.array_equal(out, data)
        assert len(starts) == 1  # loaded once, on the connect thread; the read waited
    finally:
        a.close()
        b.close()


def test_hits_of_a_peer_whose_agent_fails_to_load_are_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rdir = str(tmp_path / "rendezvous")
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    try:
        tier = b.chain[-1].tier
        _slowed(tier, monkeypatch, fail=True)
        tokens, data = _offload(a, 4, 53)
        keys = b.hash_tokens(tokens)
        assert tier.probe(keys) == [True] * 4  # its published hashes
        out = np.zeros_like(data)
        assert tier.read(list(range(4)), keys, list(out)) == [False] * 4
        assert not out.any()
        assert not _up(b) and tier.stats()["peer_drops"] >= 1
        assert tier.probe(keys) == [False] * 4  # dropped until retry_after_s
    finally:
        a.close()
        b.close()

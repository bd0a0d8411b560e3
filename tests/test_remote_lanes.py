"""The remote reader's copy lanes (``read_threads``): threads with one NIXL agent each,
every one READing parts of a batch and hashing what it READ.

Two transfers at once on one agent crashed the process, so each lane has its own
agent; these tests run transfers on several agents at once (and reads from two
threads), check the bytes, and check that a block changed after its lease is a miss
whichever lane READ and hashed it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
pytest.importorskip("msgpack", reason="msgpack is not installed: pip install 'kvbm[remote]'")

from remote_pair import config as _config  # noqa: E402
from remote_pair import flip_after_lease, rewrite_before_lease  # noqa: E402
from remote_pair import offload as _offload  # noqa: E402
from remote_pair import onboard as _onboard  # noqa: E402

from kvbm import KvBlockManager  # noqa: E402
from kvbm_tiers_remote._lanes import CopyLanes  # noqa: E402
from kvbm_tiers_remote._reader import BlockReader  # noqa: E402

# 4 KiB blocks, one block per READ: a batch of 4 is 4 parts, spread over the lanes.
ONE_BLOCK_PARTS = {"verify_bytes": 4096, "checksum_cache": False}


def _stats(mgr: KvBlockManager) -> dict[str, Any]:
    return mgr.chain[-1].tier.stats()  # type: ignore[no-any-return]


def _on_a_lane_thread() -> bool:
    """Whether this is one of the extra lanes' threads (the pool's, see CopyLanes)."""
    return "-read_" in threading.current_thread().name


class _Alternating:
    """A step's parts handed out in turn: even ones to a lane's thread, odd ones to the
    calling thread, so a test knows which lane READ and hashed each block."""

    def __init__(self, units: list[Any]) -> None:
        self._units = units
        self._n = 0
        self._cv = threading.Condition()

    def __len__(self) -> int:
        return len(self._units)

    def __iter__(self) -> _Alternating:
        return self

    def __next__(self) -> Any:
        mine = 0 if _on_a_lane_thread() else 1
        with self._cv:
            self._cv.wait_for(lambda: self._n >= len(self._units) or self._n % 2 == mine, 5.0)
            if self._n >= len(self._units):
                raise StopIteration
            u = self._units[self._n]
            self._n += 1
            self._cv.notify_all()
            return u


def _alternate_lanes(monkeypatch: pytest.MonkeyPatch) -> dict[int, str]:
    """Hand out each step's parts in turn between a lane's thread and the calling one;
    returns which thread hashed each block (block index -> 'calling' or 'other')."""
    hashed_by: dict[int, str] = {}
    real_run, real_block = CopyLanes.run, BlockReader._hash_block

    def run(self: CopyLanes, lanes: Any, units: Any, work: Any, *args: Any) -> None:
        real_run(self, lanes, _Alternating(list(units)) if len(units) > 1 else units, work, *args)

    def record_block(self: BlockReader, s: Any, i: int, dst: Any) -> None:
        hashed_by[i] = "other" if _on_a_lane_thread() else "calling"
        real_block(self, s, i, dst)

    monkeypatch.setattr(CopyLanes, "run", run)
    monkeypatch.setattr(BlockReader, "_hash_block", record_block)
    return hashed_by


@pytest.mark.parametrize("bad", [1, 2], ids=["calling-lane", "other-lane"])
def test_block_changed_after_its_lease_is_a_miss_whichever_lane_hashed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: int
) -> None:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "checksum_cache": False}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, **ONE_BLOCK_PARTS,
                                            "speculative_reads": False}))
    try:
        tokens, data = _offload(a, 4, 41)
        flip_after_lease(monkeypatch, a, tokens, bad)
        hashed_by = _alternate_lanes(monkeypatch)
        before = _stats(b)["checksum_failures"]
        loaded, out = _onboard(b, tokens, 4)
        # The lane that READ and hashed the changed block is the one named in the id.
        assert hashed_by[bad] == ("calling" if bad == 1 else "other")
        assert loaded == bad  # a miss, and the prefix stops there
        assert np.array_equal(out[:bad], data[:bad])
        assert _stats(b)["checksum_failures"] == before + 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("bad", [1, 2], ids=["calling-lane", "other-lane"])
def test_slot_rewritten_before_the_pin_is_a_miss_whichever_lane_read_it_speculatively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: int
) -> None:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "checksum_cache": False}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, **ONE_BLOCK_PARTS}))
    try:
        tokens, data = _offload(a, 4, 42)
        assert _onboard(b, tokens, 4)[0] == 4  # learns the addresses
        rewrite_before_lease(monkeypatch, a, tokens, bad, wait_s=0.5)
        hashed_by = _alternate_lanes(monkeypatch)
        loaded, out = _onboard(b, tokens, 4)
        assert _stats(b)["speculative_blocks"] == 4
        assert hashed_by[bad] == ("calling" if bad == 1 else "other")
        assert loaded == bad  # the block held the old bytes: a miss
        assert np.array_equal(out[:bad], data[:bad])
        assert _stats(b)["checksum_failures"] == 1
    finally:
        a.close()
        b.close()


def test_reads_from_two_peers_on_two_threads_with_three_lanes_each_are_byte_exact(
    tmp_path: Path,
) -> None:
    # Transfers on three agents at once, two calling threads sharing the extra lanes.
    rdir = str(tmp_path / "rendezvous")
    a1 = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    a2 = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "read_threads": 3,
                                            "verify_bytes": 4096}))
    try:
        batches = [_offload(a1, 12, 43), _offload(a2, 12, 44)]
        tier = b.chain[-1].tier
        errors: list[BaseException] = []

        def reader(tokens: list[int], data: np.ndarray) -> None:
            keys = b.hash_tokens(tokens)
            out = np.zeros_like(data)
            try:
                for rep in range(15):
                    out[:] = 0
                    ok = tier.read(list(range(len(keys))), keys, list(out))
                    assert ok == [True] * len(keys), f"rep {rep}: {ok}"
                    assert np.array_equal(out, data), f"rep {rep}: bytes differ"
            except BaseException as e:  # noqa: BLE001 - reported on the test's thread
                errors.append(e)

        threads = [threading.Thread(target=reader, args=bd) for bd in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors[0]
        lanes = tier._reader._lanes
        assert lanes._extra is not None and len(lanes._extra) == 2  # three agents READ
        st = _stats(b)
        assert st["blocks_read"] == 2 * 15 * 12
        assert st["transfer_errors"] == 0 and st["peer_drops"] == 0
    finally:
        a1.close()
        a2.close()
        b.close()


def test_read_threads_one_reads_on_the_calling_thread_alone(tmp_path: Path) -> None:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "read_threads": 1,
                                            "verify_bytes": 4096}))
    try:
        tokens, data = _offload(a, 6, 45)
        seen: set[bool] = set()
        real = BlockReader._read

        def record(self: BlockReader, lane: Any, peer: Any, s: Any) -> None:
            seen.add(_on_a_lane_thread())
            real(self, lane, peer, s)

        BlockReader._read = record  # type: ignore[method-assign]
        try:
            loaded, out = _onboard(b, tokens, 6)
        finally:
            BlockReader._read = real  # type: ignore[method-assign]
        assert loaded == 6
        assert np.array_equal(out, data)
        assert seen == {False}  # never on a lane's thread
        assert b.chain[-1].tier._reader._lanes._extra is None  # no second agent made
    finally:
        a.close()
        b.close()


class _FakeAgent:
    def register_memory(self, descs: Any, kind: str) -> Any:
        return descs


def test_lanes_run_every_unit_once_and_raise_the_first_failure_after_all_stop() -> None:
    lanes = CopyLanes("t", 3, _FakeAgent(), threading.RLock(), lambda k: _FakeAgent())
    try:
        all_lanes = [lanes.main, *lanes._extras()]
        assert len(all_lanes) == 3
        done: list[int] = []
        lanes.run(all_lanes, list(range(50)), lambda lane, u: done.append(u))
        assert sorted(done) == list(range(50))

        running: list[int] = []

        def work(lane: Any, u: int) -> None:
            running.append(u)
            time.sleep(0.002)
            if u == 5:
                raise ValueError("unit 5 failed")
            running.remove(u)

        with pytest.raises(ValueError, match="unit 5"):
            lanes.run(all_lanes, list(range(200)), work)
        assert running == [5]  # every other unit begun had ended when run raised
    finally:
        lanes.close()


def test_a_read_that_comes_while_another_threads_first_listing_runs_waits_for_its_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two threads read at once from a tier that has not listed the rendezvous yet: the
    # one that does not run the listing must wait for its peers, not read from none.
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir}))
    # Listings at most every 1 s: the second thread comes inside the first one's.
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "publish_interval_s": 2.0}))
    try:
        tokens, data = _offload(a, 4, 46)
        tier = b.chain[-1].tier
        rdv = tier._peer_set._rdv
        real_listing = rdv.listing

        def slow_listing() -> Any:
            time.sleep(0.3)  # the second thread arrives while this runs
            return real_listing()

        monkeypatch.setattr(rdv, "listing", slow_listing)
        keys = b.hash_tokens(tokens)
        outs = [np.zeros_like(data) for _ in range(2)]
        got: list[list[bool]] = [[], []]

        def reader(k: int) -> None:
            got[k] = tier.read(list(range(len(keys))), keys, list(outs[k]))

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(30)
        assert got == [[True] * 4, [True] * 4]
        assert all(np.array_equal(o, data) for o in outs)
    finally:
        a.close()
        b.close()


def test_the_extra_lanes_are_made_when_the_tier_starts_not_in_the_first_read(tmp_path: Path) -> None:
    m = KvBlockManager.from_config(_config({"rendezvous_dir": str(tmp_path / "rendezvous"),
                                            "read_threads": 3}))
    try:
        lanes = m.chain[-1].tier._reader._lanes
        assert lanes._warm is not None
        lanes._warm.join(30)
        assert lanes._extra is not None and len(lanes._extra) == 2, "made before any read"
    finally:
        m.close()
    # The control: lanes nobody warms make their agents on first use only.
    cold = CopyLanes("t", 3, _FakeAgent(), threading.RLock(), lambda k: _FakeAgent())
    assert cold._extra is None and cold._warm is None

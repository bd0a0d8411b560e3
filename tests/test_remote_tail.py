"""The remote reader's tail: a copy lane with nothing left to READ takes the hashes of
another lane's last READ (``CopyLanes.run``'s finishing tasks), and the calling thread
reads the speculative lease reply while the other lanes end their READs.

A block hashed by a lane that did not READ it is held to the same check as any other:
changed after its lease, or rewritten before the pin, it is a miss.
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

# 4 KiB blocks, 8 a batch, READs of 2 blocks: with two lanes the 8 blocks are READ in
# parts [0, 1], [2, 3], [4, 5], [6, 7] (speculative: one step; otherwise a first step
# of 4 blocks, then the rest), so each READ leaves two hashes.
READER = {"verify_bytes": 2 * 4096, "checksum_cache": False}
BAD = 2  # the first block of the part [2, 3]


class _FakeAgent:
    def register_memory(self, descs: Any, kind: str) -> Any:
        return descs


def _steal_hash_of(bad: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the lane that READ block ``bad``'s part leave ``bad``'s hash to another lane:
    it takes the part's last block first (the lane's own tasks go last in, first out)
    and holds it until someone else has hashed ``bad`` (5 s at most, then it hashes
    ``bad`` itself and the test's check of who hashed it fails). Returns the threads
    that READ and hashed ``bad``."""
    who: dict[str, int] = {}
    real_read, real_block = BlockReader._read, BlockReader._hash_block

    def read(self: BlockReader, lane: Any, peer: Any, s: Any) -> None:
        real_read(self, lane, peer, s)
        if bad in s.idx:
            who["read"] = threading.get_ident()

    def hash_block(self: BlockReader, s: Any, i: int, dst: Any) -> None:
        if bad in s.idx and i != bad and who.get("read") == threading.get_ident():
            until = time.monotonic() + 5.0
            while "hashed" not in who and time.monotonic() < until:
                time.sleep(0.001)
        real_block(self, s, i, dst)
        if i == bad:
            who["hashed"] = threading.get_ident()

    monkeypatch.setattr(BlockReader, "_read", read)
    monkeypatch.setattr(BlockReader, "_hash_block", hash_block)
    return who


def test_block_changed_after_its_lease_is_a_miss_when_another_lane_hashed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "checksum_cache": False}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, **READER,
                                            "speculative_reads": False}))
    try:
        tokens, data = _offload(a, 8, 51)
        flip_after_lease(monkeypatch, a, tokens, BAD)
        who = _steal_hash_of(BAD, monkeypatch)
        loaded, out = _onboard(b, tokens, 8)
        assert who["hashed"] != who["read"]  # the lane that did not READ it hashed it
        assert loaded == BAD  # a miss, and the prefix stops there
        assert np.array_equal(out[:BAD], data[:BAD])
        assert b.chain[-1].tier.stats()["checksum_failures"] == 1
    finally:
        a.close()
        b.close()


def test_slot_rewritten_before_the_pin_is_a_miss_when_another_lane_hashed_its_speculative_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rdir = str(tmp_path / "rendezvous")
    a = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, "checksum_cache": False}))
    b = KvBlockManager.from_config(_config({"rendezvous_dir": rdir, **READER}))
    try:
        tokens, data = _offload(a, 8, 52)
        assert _onboard(b, tokens, 8)[0] == 8  # learns the addresses
        rewrite_before_lease(monkeypatch, a, tokens, BAD, wait_s=0.3)
        who = _steal_hash_of(BAD, monkeypatch)
        before = b.chain[-1].tier.stats()["speculative_blocks"]
        loaded, out = _onboard(b, tokens, 8)
        assert b.chain[-1].tier.stats()["speculative_blocks"] == before + 8
        assert who["hashed"] != who["read"]
        assert loaded == BAD  # the block held the old bytes: a miss
        assert np.array_equal(out[:BAD], data[:BAD])
        assert b.chain[-1].tier.stats()["checksum_failures"] == 1
    finally:
        a.close()
        b.close()


def test_a_lane_with_nothing_left_takes_the_finishing_tasks_of_another_lanes_unit() -> None:
    lanes = CopyLanes("t", 2, _FakeAgent(), threading.RLock(), lambda k: _FakeAgent())
    try:
        both = [lanes.main, *lanes._extras()]
        met = threading.Barrier(2, timeout=5)  # each lane takes one of the two units
        ran: dict[str, int] = {}
        events: list[str] = []
        owner: dict[int, int] = {}

        def slow_first(name: str) -> Any:
            def task() -> None:
                # The owner's first task (its last in) waits for the other to be taken.
                until = time.monotonic() + 5.0
                while "x" not in ran and time.monotonic() < until:
                    time.sleep(0.001)
                ran[name] = threading.get_ident()
            return task

        def work(lane: Any, u: int) -> list[Any]:
            met.wait()
            owner[u] = threading.get_ident()
            if lane is lanes.main:
                return [lambda: ran.__setitem__("m", threading.get_ident())]
            time.sleep(0.05)  # a slow READ: the calling lane is out of units by now
            return [lambda: ran.__setitem__("x", threading.get_ident()), slow_first("y")]

        def after() -> None:
            events.append("after" if "y" not in ran else "after, too late")

        lanes.run(both, [0, 1], work, after=after)
        me = threading.get_ident()
        other = next(t for t in owner.values() if t != me)
        assert set(ran) == {"m", "x", "y"}  # every task once
        assert ran["y"] == other  # the READing lane ran its own last task
        assert ran["x"] == me  # and the free calling lane took the other one
        assert events == ["after"]  # once, before the other lane's unit had ended
    finally:
        lanes.close()


def test_a_failing_finishing_task_is_raised_after_every_lane_stopped() -> None:
    lanes = CopyLanes("t", 2, _FakeAgent(), threading.RLock(), lambda k: _FakeAgent())
    try:
        both = [lanes.main, *lanes._extras()]
        running: list[int] = []

        def work(lane: Any, u: int) -> list[Any]:
            running.append(u)
            time.sleep(0.002)
            running.remove(u)

            def task() -> None:
                if u == 7:
                    raise ValueError("task of unit 7 failed")
            return [task]

        with pytest.raises(ValueError, match="unit 7"):
            lanes.run(both, list(range(100)), work)
        assert running == []  # no unit was still running when run raised
    finally:
        lanes.close()

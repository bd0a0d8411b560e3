"""Small cascade writes (host -> disk demotions) gathered into one disk write
(``kvbm.staging.CascadeBatch``): each copy gets its own blocks' flags, a queued block
stays served by the host tier until its disk write is done, ``flush`` writes the queue
at once, and a failed gathered write leaves every block of it off the disk."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm import KvBlockManager
from kvbm.staging import CascadeBatch
from kvbm_bench.engine_np import NumpyEngineBlocks
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE

MODEL = {"name": "tiny8k", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "dtype": "float32"}


def make(tmp_path: Path, host_blocks: int = 32) -> KvBlockManager:
    mgr = KvBlockManager.from_config({
        "model": MODEL, "page_size": PAGE,
        "tiers": [{"type": "host", "name": "host", "num_blocks": host_blocks},
                  {"type": "disk", "name": "disk", "num_blocks": 128, "admission": "all",
                   "path": str(tmp_path)}]})
    mgr.executor.cascade.max_wait_s = 3600.0  # only the count of waiters or a flush sends
    return mgr


def blocks(mgr: KvBlockManager, n: int, seed: int) -> tuple[list[bytes], np.ndarray, Any]:
    rng = np.random.default_rng(seed)
    hashes = mgr.hash_tokens(rng.integers(0, 10**6, n * PAGE))
    data = rng.integers(0, 256, (n, mgr.block_bytes), dtype=np.uint8)
    eng = NumpyEngineBlocks(mgr.layout, n)
    eng.copy_in(list(range(n)), list(data))
    return hashes, data, eng


def onboarded(mgr: KvBlockManager, hashes: list[bytes]) -> tuple[list[str], np.ndarray]:
    """Where a match finds ``hashes`` and the bytes an onboard of them gives."""
    eng = NumpyEngineBlocks(mgr.layout, len(hashes))
    with mgr.match_prefix(hashes) as m:
        tiers = list(m.tiers)
        res = mgr.onboard(m, eng, indices=list(range(m.num_blocks)), promote=False)
    out = [np.zeros(mgr.block_bytes, np.uint8) for _ in range(res.loaded)]
    eng.copy_out(list(range(res.loaded)), out)
    return tiers, np.stack(out) if out else np.zeros((0, mgr.block_bytes), np.uint8)


def disk_writes(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    """Record the size of every ``DiskTier.write`` call (raising instead with ``fail``)."""
    calls: list[int] = []
    real = DiskTier.write

    def write(self: DiskTier, slots: Sequence[int], keys: Any, src: Any) -> list[bool]:
        calls.append(len(slots))
        if fail:
            raise OSError(5, "injected write failure")
        return real(self, slots, keys, src)

    monkeypatch.setattr(DiskTier, "write", write)
    return calls


def push_out_of_host(mgr: KvBlockManager, n: int = 32) -> None:
    """Offload ``n`` other blocks (4 at a time, flushed): the host tier's older blocks go."""
    hashes, _, eng = blocks(mgr, n, seed=99)
    for a in range(0, n, 4):
        mgr.offload(hashes[a:a + 4], eng, indices=list(range(a, a + 4)))
        assert mgr.flush(timeout=30)


def test_three_small_demotions_reach_the_disk_in_one_write_byte_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = disk_writes(monkeypatch)
    with make(tmp_path) as mgr:
        sets = [blocks(mgr, 6, seed) for seed in (1, 2, 3)]
        for hashes, _, eng in sets:
            mgr.offload(hashes, eng)
        assert mgr.flush(timeout=30)
        assert calls == [18], "io_threads 4: the third waiting copy sends all three"
        push_out_of_host(mgr)
        for hashes, data, _ in sets:
            tiers, got = onboarded(mgr, hashes)
            assert tiers == ["disk"] * 6
            assert np.array_equal(got, data)


def test_a_queued_demotion_is_served_from_the_host_tier_until_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = disk_writes(monkeypatch)
    with make(tmp_path) as mgr:
        hashes, data, eng = blocks(mgr, 5, seed=4)
        mgr.offload(hashes, eng)
        ex = mgr.executor
        for _ in range(2000):  # the cascade reaches the queue on an I/O thread
            if ex.cascade.queued():
                break
            threading.Event().wait(0.005)
        assert ex.cascade.queued() == 5 and calls == [], "queued, not written"
        tiers, got = onboarded(mgr, hashes)
        assert tiers == ["host"] * 5 and np.array_equal(got, data)
        assert ex.cascade.queued() == 5, "still queued while the host tier served it"
        assert mgr.flush(timeout=30) and calls == [5]


def test_flush_writes_the_queued_demotions_at_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = disk_writes(monkeypatch)
    with make(tmp_path) as mgr:
        hashes, data, eng = blocks(mgr, 3, seed=5)
        mgr.offload(hashes, eng)
        assert mgr.flush(timeout=10), "flush waited for the queue's timer (an hour)"
        assert calls == [3]
        push_out_of_host(mgr)
        tiers, got = onboarded(mgr, hashes)
        assert tiers == ["disk"] * 3 and np.array_equal(got, data)


def test_a_failed_gathered_write_leaves_its_blocks_off_the_disk_and_in_the_host_tier(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with make(tmp_path, host_blocks=64) as mgr:
        calls = disk_writes(monkeypatch, fail=True)
        sets = [blocks(mgr, 4, seed) for seed in (6, 7)]
        for hashes, _, eng in sets:
            mgr.offload(hashes, eng)
        assert mgr.flush(timeout=30)
        assert sum(calls) == 8
        disk = mgr.stats()["tiers"]["disk"]
        assert disk["failed_writes"] == 8 and disk["stored_blocks"] == 0 and disk["used_blocks"] == 0
        for hashes, data, _ in sets:
            tiers, got = onboarded(mgr, hashes)
            assert tiers == ["host"] * 4 and np.array_equal(got, data)


class FakeExecutor:
    """``_write`` flags a slot True unless it is a multiple of 3; records every slot."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.lock = threading.Lock()

    def _write(self, t: int, slots: list[int], keys: Any, bufs: Any) -> list[bool]:
        with self.lock:
            self.written.extend(slots)
        return [s % 3 != 0 for s in slots]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(1, 4),
       st.integers(1, 80))
def test_each_copy_gets_the_flags_of_its_own_blocks_and_each_block_is_written_once(
        sizes: list[int], waiters: int, min_blocks: int) -> None:
    cb = CascadeBatch(min_blocks=min_blocks, max_wait_s=0.05, max_waiters=waiters)
    ex = FakeExecutor()
    start = 0
    jobs: list[list[int]] = []
    for n in sizes:
        jobs.append(list(range(start, start + n)))
        start += n
    got: dict[int, list[bool]] = {}

    def run(i: int) -> None:
        ok, idle = cb.write(ex, 1, jobs[i], [b""] * len(jobs[i]), [None] * len(jobs[i]))  # type: ignore[arg-type]
        assert idle >= 0.0
        got[i] = ok

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(ex.written) == list(range(start))
    for i, slots in enumerate(jobs):
        assert got[i] == [s % 3 != 0 for s in slots]
    assert cb.queued() == 0

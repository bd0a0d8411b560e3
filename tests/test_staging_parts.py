"""Onboards from a tier that sets ``Tier.onboard_part_blocks`` into an engine that offers
no views and with no promotion read through staging buffers in parts
(``kvbm.staging.read_staged_parts``): part k+1 is read on a thread while part k is
copied into the engine. Bytes land exactly, a failed part is a miss while the others
load, every part's read has finished before the load returns, and each staging buffer
goes back to the pool once."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_staging_promotion import _RaisingEngine  # an engine whose copy_in raises

from kvbm import KvBlockManager
from kvbm.errors import LayoutError
from kvbm_bench.engine_np import NumpyEngineBlocks
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE

MODEL = {"name": "tiny8k", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "dtype": "float32"}
N = 8


def make(tmp_path: Path) -> KvBlockManager:
    """A disk tier alone: no memory tier above it, so nothing is promoted."""
    return KvBlockManager.from_config({
        "model": MODEL, "page_size": PAGE,
        "tiers": [{"type": "disk", "name": "disk", "num_blocks": 64, "admission": "all",
                   "path": str(tmp_path)}]})


def on_disk(mgr: KvBlockManager) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(7)
    hashes = mgr.hash_tokens(rng.integers(0, 1000, N * PAGE))
    data = rng.integers(0, 256, (N, mgr.block_bytes), dtype=np.uint8)
    eng = NumpyEngineBlocks(mgr.layout, N)
    eng.copy_in(list(range(N)), list(data))
    mgr.offload(hashes, eng, indices=list(range(N)))
    mgr.flush()
    return hashes, data


def engine_bytes(eng: NumpyEngineBlocks) -> np.ndarray:
    out = [np.zeros(eng.layout.bytes_per_block, np.uint8) for _ in range(N)]
    eng.copy_out(list(range(N)), out)
    return np.stack(out)


def watch_reads(monkeypatch: pytest.MonkeyPatch, mgr: KvBlockManager,
                fail_call: int = -1) -> tuple[list[int], list[int]]:
    """Record each tier read's size; the ``fail_call``-th read raises; ``busy`` counts
    reads still running (each sleeps so the later parts outlast the first copy)."""
    tier = mgr.chain[0].tier
    real = tier.read
    calls: list[int] = []
    busy = [0]

    def read(slots: Sequence[int], keys: Any, dst: Any) -> list[bool]:
        calls.append(len(slots))
        busy[0] += 1
        try:
            time.sleep(0.02)
            if len(calls) - 1 == fail_call:
                raise OSError("an injected read error")
            return list(real(slots, keys, dst))
        finally:
            busy[0] -= 1

    monkeypatch.setattr(tier, "read", read)
    return calls, busy


def test_a_staged_batch_read_in_parts_is_byte_exact(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiskTier, "onboard_part_blocks", 2)
    with make(tmp_path) as mgr:
        hashes, data = on_disk(mgr)
        calls, busy = watch_reads(monkeypatch, mgr)
        eng = NumpyEngineBlocks(mgr.layout, N)
        with mgr.match_prefix(hashes) as m:
            assert list(m.tiers) == ["disk"] * N
            res = mgr.onboard(m, eng, indices=list(range(N)))
        assert res.loaded == N
        assert calls == [2, 2, 2, 2], "four parts, read one after the other"
        assert busy[0] == 0 and not any(t.name == "kvbm-staged-read" for t in threading.enumerate())
        assert np.array_equal(engine_bytes(eng), data)


def test_a_failed_part_is_a_miss_while_the_other_parts_load(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiskTier, "onboard_part_blocks", 2)
    with make(tmp_path) as mgr:
        hashes, data = on_disk(mgr)
        calls, busy = watch_reads(monkeypatch, mgr, fail_call=1)  # blocks 2 and 3
        eng = NumpyEngineBlocks(mgr.layout, N)
        with mgr.match_prefix(hashes) as m:
            res = mgr.onboard(m, eng, indices=list(range(N)))
        assert res.loaded == 2 and sorted(res.failed) == [2, 3]
        got = engine_bytes(eng)
        assert calls == [2, 2, 2, 2] and busy[0] == 0
        assert np.array_equal(got[:2], data[:2]) and np.array_equal(got[4:], data[4:])
        assert not got[2:4].any(), "a failed part's bytes reached the engine"


def test_each_staging_buffer_goes_back_to_the_pool_once(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiskTier, "onboard_part_blocks", 2)
    with make(tmp_path) as mgr:
        hashes, _ = on_disk(mgr)
        watch_reads(monkeypatch, mgr, fail_call=2)
        pool = mgr.executor.staging
        with mgr.match_prefix(hashes) as m:
            mgr.onboard(m, NumpyEngineBlocks(mgr.layout, N), indices=list(range(N)))
        assert pool.settle(10.0)  # a chunk grown ahead lands in the free list too
        free = [b.ctypes.data for b in pool._free]
        assert len(free) == len(set(free)) == pool.allocated, "a buffer was released twice or kept"


def test_an_engine_error_propagates_only_after_every_part_was_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiskTier, "onboard_part_blocks", 2)
    with make(tmp_path) as mgr:
        hashes, _ = on_disk(mgr)
        calls, busy = watch_reads(monkeypatch, mgr)
        pool = mgr.executor.staging
        with mgr.match_prefix(hashes) as m, pytest.raises(LayoutError):
            mgr.onboard(m, _RaisingEngine(mgr.layout, N), indices=list(range(N)))
        assert calls and busy[0] == 0, "a part's read was still writing a staging buffer"
        assert not any(t.name == "kvbm-staged-read" for t in threading.enumerate())
        assert pool.settle(10.0)
        assert len(pool._free) == pool.allocated, "a part's buffers were not released"

"""Onboards from the disk tier read straight into their promotion slots of the host
tier (``kvbm.staging.read_into_promotion``): the engine gets the bytes from there, the
promotion copies nothing, a failed read stays a miss that the host tier never serves,
and every part's read has finished before a load returns or raises."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbm import KvBlockManager
from kvbm.errors import LayoutError
from kvbm.staging import _parts
from kvbm_bench.engine_np import NumpyEngineBlocks
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE

#: 8 KiB blocks: host arena rows are page-aligned, so O_DIRECT reads straight into them.
HOST_MAX = 16  # blocks offloaded after the ones a test reads: the host tier's most
MODEL = {"name": "tiny8k", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "dtype": "float32"}


def make(tmp_path: Path, host_blocks: int = 8) -> KvBlockManager:
    return KvBlockManager.from_config({
        "model": MODEL, "page_size": PAGE,
        "tiers": [{"type": "host", "name": "host", "num_blocks": host_blocks},
                  {"type": "disk", "name": "disk", "num_blocks": 64, "admission": "all",
                   "path": str(tmp_path)}]})


def on_disk_only(mgr: KvBlockManager, n: int) -> tuple[list[bytes], np.ndarray]:
    """``n`` blocks written through the host tier to disk, then pushed out of the host
    tier by as many others (so a match finds them on disk only)."""
    rng = np.random.default_rng(n)
    total = n + HOST_MAX
    hashes = mgr.hash_tokens(rng.integers(0, 1000, total * PAGE))
    data = rng.integers(0, 256, (total, mgr.block_bytes), dtype=np.uint8)
    eng = NumpyEngineBlocks(mgr.layout, total)
    eng.copy_in(list(range(total)), list(data))
    mgr.offload(hashes[:n], eng, indices=list(range(n)))
    mgr.flush()
    for a in range(n, total, 4):  # separate prefixes: the first n stay matchable
        mgr.offload(hashes[a:a + 4], eng, indices=list(range(a, a + 4)))
        mgr.flush()
    return hashes[:n], data[:n]


def onboard(mgr: KvBlockManager, hashes: list[bytes], eng: Any) -> tuple[Any, list[str]]:
    with mgr.match_prefix(hashes) as m:
        tiers = list(m.tiers)
        res = mgr.onboard(m, eng, indices=list(range(m.num_blocks)))
    return res, tiers


def engine_bytes(eng: Any, n: int) -> np.ndarray:
    out = [np.zeros(eng.layout.bytes_per_block, np.uint8) for _ in range(n)]
    eng.copy_out(list(range(n)), out)
    return np.stack(out)


def new_engine(kind: str, mgr: KvBlockManager, n: int) -> Any:
    """numpy buffers (copied through views), or the torch adapter (copied by row number
    from the host tier's rows, as ``kvbm bench``'s engine)."""
    if kind == "numpy":
        return NumpyEngineBlocks(mgr.layout, n)
    torch = pytest.importorskip("torch")
    from kvbm.engine_blocks import engine_blocks

    m = mgr.layout.model
    kv = [torch.zeros(m.outer_dim, n, PAGE, m.num_kv_heads, m.head_dim, dtype=torch.float32)
          for _ in range(m.num_layers)]
    return engine_blocks(kv, mgr.layout)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_blocks_from_disk_reach_the_engine_and_the_host_tier_byte_exact_without_staging(
        tmp_path: Path, kind: str) -> None:
    with make(tmp_path) as mgr:
        hashes, data = on_disk_only(mgr, 6)
        eng = new_engine(kind, mgr, 6)
        res, tiers = onboard(mgr, hashes, eng)
        assert tiers == ["disk"] * 6 and res.loaded == 6
        assert np.array_equal(engine_bytes(eng, 6), data)
        assert mgr.executor.staging.peak_in_use == 0, "read into the promotion slots, not staging"
        eng2 = new_engine(kind, mgr, 6)
        res, tiers = onboard(mgr, hashes, eng2)
        assert tiers == ["host"] * 6, "promoted"
        assert np.array_equal(engine_bytes(eng2, 6), data), "the promoted slots hold the bytes"


def test_a_layer_wise_load_from_disk_reads_into_the_slots_and_copies_each_layer_from_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with make(tmp_path) as mgr:
        hashes, data = on_disk_only(mgr, 6)
        ex = mgr.executor
        real = ex.load
        layers: list[int] = []
        monkeypatch.setattr(ex, "load", lambda ops, dest, on_layer=None: real(
            ops, dest, on_layer=layers.append))
        eng = new_engine("torch", mgr, 6)
        res, tiers = onboard(mgr, hashes, eng)
        assert tiers == ["disk"] * 6 and res.loaded == 6
        assert layers == list(range(mgr.layout.model.num_layers))
        assert np.array_equal(engine_bytes(eng, 6), data)
        assert ex.staging.peak_in_use == 0, "read into the promotion slots, not staging"
        monkeypatch.setattr(ex, "load", real)
        eng2 = new_engine("torch", mgr, 6)
        res, tiers = onboard(mgr, hashes, eng2)
        assert tiers == ["host"] * 6, "promoted"
        assert np.array_equal(engine_bytes(eng2, 6), data), "the promoted slots hold the bytes"


def test_a_corrupt_block_read_into_its_slot_is_a_miss_the_host_tier_never_serves(
        tmp_path: Path) -> None:
    from test_disk_faults import flip_byte

    with make(tmp_path) as mgr:
        hashes, data = on_disk_only(mgr, 4)
        disk = mgr.chain[1]
        tier = disk.tier
        assert isinstance(tier, DiskTier)
        slot = disk.registry.lookup(hashes[2])
        assert slot is not None
        st_, local = tier._locate(slot)
        flip_byte(st_.path, tier.geom.data_offset(local) + 7)
        eng = NumpyEngineBlocks(mgr.layout, 4)
        res, _ = onboard(mgr, hashes, eng)
        assert res.loaded == 2, "the prefix ends at the corrupt block"
        assert np.array_equal(engine_bytes(eng, 2), data[:2])
        assert not engine_bytes(eng, 4)[2].any(), "no byte of the corrupt block in the engine"
        with mgr.match_prefix(hashes) as m:
            tiers = list(m.tiers)
        assert tiers[:2] == ["host", "host"] and "host" not in tiers[2:], (
            "the corrupt block's promotion slot is not served")


def test_a_batch_read_in_parts_is_byte_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiskTier, "onboard_part_blocks", 2)
    with make(tmp_path, host_blocks=16) as mgr:
        hashes, data = on_disk_only(mgr, 8)
        tier = mgr.chain[1].tier
        calls: list[int] = []
        real = tier.read

        def read(slots: Sequence[int], keys: Any, dst: Any) -> list[bool]:
            calls.append(len(slots))
            return real(slots, keys, dst)

        monkeypatch.setattr(tier, "read", read)
        eng = NumpyEngineBlocks(mgr.layout, 8)
        res, tiers = onboard(mgr, hashes, eng)
        assert tiers == ["disk"] * 8 and res.loaded == 8
        assert calls == [2, 2, 2, 2], "four parts, read one after the other"
        assert np.array_equal(engine_bytes(eng, 8), data)


class _RaisingEngine(NumpyEngineBlocks):
    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        raise LayoutError("a bad engine block")


def test_an_engine_error_propagates_only_after_every_part_was_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DiskTier, "onboard_part_blocks", 2)
    with make(tmp_path, host_blocks=16) as mgr:
        hashes, _ = on_disk_only(mgr, 8)
        tier = mgr.chain[1].tier
        real = tier.read
        reading = threading.Event()
        busy = [0]

        def read(slots: Sequence[int], keys: Any, dst: Any) -> list[bool]:
            busy[0] += 1
            reading.set()
            time.sleep(0.05)  # the later parts are still being read when the first fails
            try:
                return real(slots, keys, dst)
            finally:
                busy[0] -= 1

        monkeypatch.setattr(tier, "read", read)
        with mgr.match_prefix(hashes) as m, pytest.raises(LayoutError):
            mgr.onboard(m, _RaisingEngine(mgr.layout, 8), indices=list(range(8)))
        assert reading.is_set() and busy[0] == 0, "a part's read was still writing a slot"
        assert not any(t.name == "kvbm-promote-read" for t in threading.enumerate())


@given(n=st.integers(1, 600), least=st.integers(0, 64))
def test_parts_cover_the_batch_in_order_each_big_enough(n: int, least: int) -> None:
    parts = _parts(n, least)
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    assert len(parts) <= 4
    if len(parts) > 1:
        assert all(b - a >= least for a, b in parts)

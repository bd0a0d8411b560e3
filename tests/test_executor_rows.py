"""The executor's row path: a host tier's slots copied to and from engine blocks by row
number (``HostTier.slot_rows`` with the adapter's ``copy_out_rows`` / ``copy_in_rows``,
or ``ContiguousBlocks``' rows), with no view per block. Each block must land in the
slot its registry names and come back byte for byte."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvbm import KvBlockManager
from kvbm.engine_blocks import _native, adapter, engine_blocks
from kvbm.errors import LayoutError
from kvbm.layout import ContiguousBlocks
from kvbm_tiers_host.tier import HostTier

from conftest import PAGE, SMALL_MODEL

torch = pytest.importorskip("torch")

if _native.copy_runs() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip("no C compiler: no row path", allow_module_level=True)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def mgr(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    # The row path never asks for views: one that does fails the test.
    def no_views(self: HostTier, slots: Any) -> Any:
        raise AssertionError("the row path asked the host tier for views")

    monkeypatch.setattr(HostTier, "views", no_views)
    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)  # the test model's runs are short
    with KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE,
                                     "copy_threads": request.param,
                                     "tiers": [{"type": "host", "num_blocks": 16}]}) as m:
        yield m


def _engine(mgr: KvBlockManager, nb: int, seed: int) -> tuple[Any, list[Any]]:
    m = mgr.layout.model
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randint(0, 256, (2, nb, PAGE, m.num_kv_heads, m.head_dim * m.itemsize),
                        generator=g, dtype=torch.uint8) for _ in range(m.num_layers)]
    return engine_blocks([t.view(getattr(torch, m.dtype)) for t in kv], mgr.layout,
                         plugins=mgr.plugins), kv


def _slot_of(mgr: KvBlockManager, h: bytes) -> int:
    slot = mgr.chain[0].registry.lookup(h)
    assert slot is not None
    return slot


def test_engine_blocks_land_in_the_slots_the_registry_names(mgr: KvBlockManager) -> None:
    engine, kv = _engine(mgr, 12, seed=1)
    hashes = mgr.hash_tokens(np.arange(6 * PAGE, dtype=np.uint32))
    ids = [9, 2, 7, 0, 11, 4]
    assert mgr.offload(hashes, engine, indices=ids).stored == 6
    rows = mgr.chain[0].tier.slot_rows()
    for h, b in zip(hashes, ids):
        want = np.concatenate([t[:, b].numpy().reshape(-1) for t in kv])
        assert np.array_equal(rows[_slot_of(mgr, h)], want), b


def test_engine_blocks_come_back_byte_for_byte_into_other_blocks(mgr: KvBlockManager) -> None:
    engine, kv = _engine(mgr, 12, seed=2)
    hashes = mgr.hash_tokens(np.arange(5 * PAGE, dtype=np.uint32) + 7)
    src, dst = [1, 3, 5, 6, 8], [10, 0, 4, 2, 11]
    mgr.offload(hashes, engine, indices=src)
    with mgr.match_prefix(hashes) as match:
        assert mgr.onboard(match, engine, indices=dst).loaded == 5
    for s, d in zip(src, dst):
        assert all(torch.equal(t[:, s], t[:, d]) for t in kv), (s, d)


def test_contiguous_blocks_go_to_their_slots_and_back(mgr: KvBlockManager) -> None:
    bb = mgr.layout.bytes_per_block
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (4, bb), dtype=np.uint8)
    hashes = mgr.hash_tokens(np.arange(4 * PAGE, dtype=np.uint32) + 99)
    mgr.offload(hashes, ContiguousBlocks(src, mgr.layout), indices=[3, 1, 0, 2])
    rows = mgr.chain[0].tier.slot_rows()
    for h, i in zip(hashes, [3, 1, 0, 2]):
        assert np.array_equal(rows[_slot_of(mgr, h)], src[i])
    dst = np.zeros((6, bb), dtype=np.uint8)
    with mgr.match_prefix(hashes) as match:
        assert mgr.onboard(match, ContiguousBlocks(dst, mgr.layout),
                           indices=[5, 0, 2, 4]).loaded == 4
    for i, d in zip([3, 1, 0, 2], [5, 0, 2, 4]):
        assert np.array_equal(dst[d], src[i])
    assert not dst[[1, 3]].any()  # rows not named stay untouched


def test_a_contiguous_index_out_of_range_is_refused_and_frees_its_slots(
        mgr: KvBlockManager) -> None:
    bb = mgr.layout.bytes_per_block
    hashes = mgr.hash_tokens(np.arange(2 * PAGE, dtype=np.uint32) + 5)
    free = mgr.chain[0].registry.num_free
    with pytest.raises(LayoutError, match=r"block index 2 is out of range \[0, 2\)"):
        mgr.executor.save(mgr.planner.plan_save(hashes, [0, 2]).plan.saves[0],
                          ContiguousBlocks(np.zeros((2, bb), np.uint8), mgr.layout))
    assert mgr.chain[0].registry.num_free == free - 2  # reserved until the planner settles


def test_a_match_split_between_host_and_disk_comes_back_byte_for_byte(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without promotion, the host's part of a match takes the row path and the disk's
    part the read path, each with its own blocks' slots and destinations."""
    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)
    with KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE, "tiers": [
            {"type": "host", "num_blocks": 4},
            {"type": "disk", "num_blocks": 16, "admission": "all", "path": str(tmp_path)}]}) as m:
        engine, kv = _engine(m, 20, seed=5)
        hashes = m.hash_tokens(np.arange(8 * PAGE, dtype=np.uint32) + 3)
        src, dst = [3, 1, 7, 5, 0, 6, 2, 4], [12, 19, 8, 15, 10, 17, 9, 14]
        m.offload(hashes, engine, indices=src)
        assert m.flush(30)
        with m.match_prefix(hashes) as match:
            assert sorted(set(match.tiers)) == sorted({t.name for t in m.chain})  # both tiers
            assert m.onboard(match, engine, indices=dst, promote=False).loaded == 8
        for s, d in zip(src, dst):
            assert all(torch.equal(t[:, s], t[:, d]) for t in kv), (s, d)

"""A large offload into a memory tier is planned in two parts, the first part copied on a
copy thread while the rest is planned: the same bytes in the same slots, no block
matchable before every part's bytes are in, and a source error frees every slot only
after no part can still be writing."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from kvbm import KvBlockManager
from kvbm import manager as manager_mod
from kvbm.engine_blocks import _native
from kvbm.errors import LayoutError
from kvbm.executor import _contiguous_rows
from kvbm.layout import ContiguousBlocks

from conftest import PAGE, SMALL_MODEL

if _native.copy_runs() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip("no C compiler: no row path, no split", allow_module_level=True)

N = 32  # blocks a batch: a first part of 4, then 28


@pytest.fixture
def mgr(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(manager_mod, "_LEAD_MIN_BYTES", 0)  # the test blocks are small
    with KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE,
                                     "copy_threads": 2,
                                     "tiers": [{"type": "host", "num_blocks": 2 * N}]}) as m:
        yield m


class _Source:
    """Contiguous blocks copied by row number, calling ``hook(first, part)`` before each
    part's copy (``first``: whether it is the part on the copy thread)."""

    native_shared = True

    def __init__(self, blocks: ContiguousBlocks, hook: Any = None) -> None:
        self.blocks = blocks
        self.hook = hook
        self.parts: list[tuple[bool, int]] = []

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        self.blocks.copy_out(indices, dst)

    def copy_out_rows(self, indices: Sequence[int], rows: np.ndarray, at: Sequence[int]) -> None:
        first = threading.current_thread() is not threading.main_thread()
        self.parts.append((first, len(indices)))
        if self.hook is not None:
            self.hook(first, list(indices))
        _contiguous_rows(self.blocks, True, indices, rows, at)


def _data(mgr: KvBlockManager, seed: int) -> tuple[list[bytes], np.ndarray]:
    src = np.random.default_rng(seed).integers(0, 256, (N, mgr.layout.bytes_per_block),
                                               dtype=np.uint8)
    return mgr.hash_tokens(np.arange(N * PAGE, dtype=np.uint32) + seed), src


def test_a_large_offload_copies_its_first_part_on_a_copy_thread_and_stores_every_block(
        mgr: KvBlockManager) -> None:
    hashes, src = _data(mgr, 1)
    source = _Source(ContiguousBlocks(src, mgr.layout))
    order = np.random.default_rng(2).permutation(N).tolist()
    assert mgr.offload(hashes, source, indices=order).stored == N
    assert sorted(source.parts) == [(False, N - 4), (True, 4)]
    rows = mgr.chain[0].tier.slot_rows()  # type: ignore[attr-defined]
    for h, i in zip(hashes, order):
        slot = mgr.chain[0].registry.lookup(h)
        assert slot is not None and np.array_equal(rows[slot], src[i]), i
    dst = np.zeros_like(src)
    with mgr.match_prefix(hashes) as m:
        assert mgr.onboard(m, ContiguousBlocks(dst, mgr.layout), indices=order).loaded == N
    assert np.array_equal(dst, src)


def test_no_block_of_a_split_offload_is_matchable_before_every_part_is_copied(
        mgr: KvBlockManager) -> None:
    hashes, src = _data(mgr, 3)
    rest_copied = threading.Event()
    seen: list[int] = []

    def hook(first: bool, indices: list[int]) -> None:
        if not first:
            rest_copied.set()
            return
        # The first part's copy holds on until the rest is copied too: even then no
        # block of the batch may be matchable (its own bytes are not in yet).
        assert rest_copied.wait(10)
        seen.extend(1 for h in hashes if mgr.chain[0].registry.lookup(h) is not None)

    assert mgr.offload(hashes, _Source(ContiguousBlocks(src, mgr.layout), hook)).stored == N
    assert seen == []
    with mgr.match_prefix(hashes) as m:
        assert m.num_blocks == N


@pytest.mark.parametrize("bad_part", ["first", "rest"])
def test_a_source_error_in_either_part_frees_every_slot_after_both_parts_finished(
        mgr: KvBlockManager, bad_part: str) -> None:
    hashes, src = _data(mgr, 4)
    finished: list[bool] = []
    other_done = threading.Event()

    def hook(first: bool, indices: list[int]) -> None:
        if first == (bad_part == "first"):
            return  # the failing part: its index is out of range
        # The part that succeeds is slow: the error must not free its slots before it ends.
        other_done.wait(0.3)
        finished.append(True)

    indices = list(range(N))
    indices[0 if bad_part == "first" else N - 1] = N + 5
    reg = mgr.chain[0].registry
    with pytest.raises(LayoutError, match=rf"block index {N + 5} is out of range"):
        mgr.offload(hashes, _Source(ContiguousBlocks(src, mgr.layout), hook), indices=indices)
    assert finished == [True]  # the good part had finished when the error came out
    assert reg.num_free == reg.capacity
    assert all(reg.lookup(h) is None for h in hashes)

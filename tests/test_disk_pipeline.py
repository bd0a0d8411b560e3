"""Disk-first offload through the manager: the pipelined staging path (a source without
views, as an engine's device memory) and the direct path from host memory. Real slot
files with O_DIRECT in tmp dirs."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import ContiguousBlocks, KvBlockManager
from kvbm.layout import aligned_empty
from kvbm_tiers_disk import tier as tier_module

from conftest import PAGE, SMALL_MODEL

# 2 x 2 x 4 x 128 x float32 = 8192 bytes: page-aligned blocks go straight to disk.
ALIGNED_MODEL = {**SMALL_MODEL, "head_dim": 64}


def disk_first(tmp_path: Path, n: int) -> dict[str, Any]:
    return {"model": dict(ALIGNED_MODEL), "page_size": PAGE,
            "tiers": [{"type": "disk", "num_blocks": n, "path": str(tmp_path), "admission": "all",
                       "io_threads": 4}]}


class CopyOnly:
    """A source that only copies out (no ``views``): the executor must stage it."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        for i, d in zip(indices, dst, strict=True):
            np.copyto(d, self.data[i])


def random_blocks(m: KvBlockManager, n: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    hashes = m.hash_tokens(list(range(seed * 100_000, seed * 100_000 + n * PAGE)))
    data = aligned_empty(n * m.block_bytes).reshape(n, m.block_bytes)
    data[:] = np.random.default_rng(seed).integers(0, 256, data.shape, dtype=np.uint8)
    return hashes, data


def onboard(m: KvBlockManager, hashes: list[bytes]) -> tuple[int, np.ndarray]:
    out = np.zeros((len(hashes), m.block_bytes), np.uint8)
    with m.match_prefix(hashes) as match:
        loaded = m.onboard(match, ContiguousBlocks(out[: match.num_blocks], m.layout)).loaded
    return loaded, out


def test_a_staged_block_is_not_matched_while_its_write_is_still_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, gated = 40, 21
    # The Python I/O loop (its os.pwritev is held here); tests/test_disk_native.py holds
    # the native loop's.
    monkeypatch.setattr(tier_module, "NATIVE_IO", False)
    with KvBlockManager.from_config(disk_first(tmp_path, 64)) as m:
        hashes, data = random_blocks(m, n, seed=1)
        started, release = threading.Event(), threading.Event()
        real = tier_module.os.pwritev

        def pwritev(fd: int, bufs: Sequence[Any], offset: int) -> int:
            # Hold the data write of block ``gated`` (its part's other blocks go on).
            b = bufs[0]
            if isinstance(b, np.ndarray) and b.nbytes == m.block_bytes and \
                    np.array_equal(b[:64], data[gated, :64]):
                started.set()
                release.wait(10)
            return real(fd, bufs, offset)

        monkeypatch.setattr(tier_module.os, "pwritev", pwritev)
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(m.offload(hashes, CopyOnly(data))))
        t.start()
        try:
            assert started.wait(10), "the gated block was never written"
            assert t.is_alive(), "offload returned while a block was still being written"
            with m.match_prefix(hashes) as match:
                seen = match.num_blocks
            assert seen <= gated, f"{seen} blocks matched while block {gated} was being written"
        finally:
            release.set()
            t.join(10)
        assert result and result[0].stored == n
        loaded, out = onboard(m, hashes)
        assert loaded == n and np.array_equal(out, data)


def test_a_staged_offload_goes_in_several_parts_and_reads_back_byte_exact(tmp_path: Path) -> None:
    with KvBlockManager.from_config(disk_first(tmp_path, 64)) as m:
        hashes, data = random_blocks(m, 40, seed=2)
        tier = m.executor.tiers[0]
        real = tier.write
        parts: list[int] = []

        def write(slots: Sequence[int], keys: Sequence[bytes], bufs: Sequence[np.ndarray]) -> Any:
            parts.append(len(slots))
            assert not any(np.shares_memory(b, data) for b in bufs), "staged blocks are copies"
            return real(slots, keys, bufs)

        tier.write = write  # type: ignore[method-assign]
        assert m.offload(hashes, CopyOnly(data)).stored == 40
        assert len(parts) > 2 and sum(parts) == 40
        loaded, out = onboard(m, hashes)
        assert loaded == 40 and np.array_equal(out, data)


def test_a_disk_first_offload_from_host_memory_writes_the_callers_blocks_without_staging(
    tmp_path: Path
) -> None:
    with KvBlockManager.from_config(disk_first(tmp_path, 64)) as m:
        hashes, data = random_blocks(m, 24, seed=3)
        tier = m.executor.tiers[0]
        real = tier.write
        handed: list[np.ndarray] = []

        def write(slots: Sequence[int], keys: Sequence[bytes], bufs: Sequence[np.ndarray]) -> Any:
            handed.extend(bufs)
            return real(slots, keys, bufs)

        tier.write = write  # type: ignore[method-assign]
        assert m.offload(hashes, ContiguousBlocks(data, m.layout)).stored == 24
        assert len(handed) == 24 and all(np.shares_memory(b, data) for b in handed)
        assert m.executor.staging.peak_in_use == 0, "no staging buffer was needed"
        loaded, out = onboard(m, hashes)
        assert loaded == 24 and np.array_equal(out, data)


def test_host_memory_that_is_not_page_aligned_is_written_through_bounce_buffers(
    tmp_path: Path
) -> None:
    with KvBlockManager.from_config(disk_first(tmp_path, 16)) as m:
        hashes, aligned = random_blocks(m, 8, seed=4)
        raw = np.zeros(aligned.size + 1, np.uint8)
        data = raw[1:].reshape(aligned.shape)  # one byte past a page boundary
        data[:] = aligned
        assert m.offload(hashes, ContiguousBlocks(data, m.layout)).stored == 8
        loaded, out = onboard(m, hashes)
        assert loaded == 8 and np.array_equal(out, aligned)



# -- the tier: checksums and headers in the finishing pool ------------------------------
def aligned_tier(tmp_path: Path, n: int = 4) -> Any:
    from kvbm import BlockLayout, ModelSpec, Namespace
    from kvbm.tier import TierContext
    from kvbm_tiers_disk.config import DiskTierConfig

    layout = BlockLayout(ModelSpec(**ALIGNED_MODEL), PAGE)
    ns = Namespace(ALIGNED_MODEL["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(tmp_path), num_blocks=n, io_threads=4)
    t = tier_module.DiskTier(cfg, TierContext("disk", ns, layout, n))
    t.recover()
    return t


def page_aligned_blocks(bb: int, n: int, seed: int) -> list[np.ndarray]:
    arena = aligned_empty(n * bb).reshape(n, bb)
    arena[:] = np.random.default_rng(seed).integers(0, 256, arena.shape, dtype=np.uint8)
    return [arena[i] for i in range(n)]


def test_a_corrupted_byte_read_straight_into_an_aligned_buffer_is_a_miss(tmp_path: Path) -> None:
    tier = aligned_tier(tmp_path)
    try:
        bb = tier.block_bytes
        src = page_aligned_blocks(bb, 3, seed=6)
        keys = [bytes([i + 1]) * 16 for i in range(3)]
        assert tier.write([0, 1, 2], keys, src) == [True] * 3
        st, local = tier._locate(1)
        with open(st.path, "r+b") as f:
            f.seek(tier.geom.data_offset(local) + 4000)
            b = f.read(1)
            f.seek(tier.geom.data_offset(local) + 4000)
            f.write(bytes([b[0] ^ 0xFF]))
        dst = page_aligned_blocks(bb, 3, seed=7)  # aligned: the tier reads into them directly
        assert tier.read([0, 1, 2], keys, dst) == [True, False, True]
        assert np.array_equal(dst[0], src[0]) and np.array_equal(dst[2], src[2])
        assert tier.stats()["checksum_failures"] == 1
    finally:
        tier.close()


def test_a_header_is_written_only_after_its_blocks_data_write_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvbm_tiers_disk.format import HEADER_BYTES, unpack_header

    monkeypatch.setattr(tier_module, "NATIVE_IO", False)  # the Python loop's os.pwritev
    tier = aligned_tier(tmp_path)
    try:
        bb = tier.block_bytes
        old, new = page_aligned_blocks(bb, 2, seed=8)
        assert tier.write([0], [b"A" * 16], [old]) == [True]
        st, local = tier._locate(0)
        started, release = threading.Event(), threading.Event()
        real = tier_module.os.pwritev

        def pwritev(fd: int, bufs: Sequence[Any], offset: int) -> int:
            if offset == tier.geom.data_offset(local):
                started.set()
                release.wait(10)
            return real(fd, bufs, offset)

        monkeypatch.setattr(tier_module.os, "pwritev", pwritev)
        result: list[list[bool]] = []
        t = threading.Thread(target=lambda: result.append(tier.write([0], [b"C" * 16], [new])))
        t.start()
        try:
            assert started.wait(10)
            with open(st.path, "rb") as f:
                f.seek(tier.geom.header_offset(local))
                hdr = f.read(HEADER_BYTES)
            assert unpack_header(memoryview(hdr)) is None, "a valid header while the data is in flight"
            out = page_aligned_blocks(bb, 1, seed=9)
            assert tier.read([0], [b"A" * 16], out) == [False]
            assert tier.read([0], [b"C" * 16], out) == [False]
        finally:
            release.set()
            t.join(10)
        assert result == [[True]]
        out = page_aligned_blocks(bb, 1, seed=9)
        assert tier.read([0], [b"C" * 16], out) == [True] and np.array_equal(out[0], new)
    finally:
        tier.close()


# -- properties -------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 2**12))
def test_any_staged_batch_size_reads_back_byte_exact(tmp_path_factory: Any, n: int, seed: int) -> None:
    """Part boundaries (one part below 8 blocks, remainders above) lose or swap no block."""
    with KvBlockManager.from_config(disk_first(tmp_path_factory.mktemp("d"), 32)) as m:
        hashes, data = random_blocks(m, n, seed=seed)
        assert m.offload(hashes, CopyOnly(data)).stored == n
        loaded, out = onboard(m, hashes)
        assert loaded == n and np.array_equal(out, data)


@settings(max_examples=12, deadline=None)
@given(aligned=st.lists(st.booleans(), min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_a_batch_mixing_aligned_and_unaligned_buffers_reads_back_byte_exact(
    tmp_path_factory: Any, aligned: list[bool], seed: int
) -> None:
    """Aligned blocks are checksummed in the finishing pool, bounced ones in their I/O
    thread (its bounce buffer takes its next block): both kinds in one batch, both ways."""
    tier = aligned_tier(tmp_path_factory.mktemp("t"), n=12)
    try:
        bb = tier.block_bytes
        n = len(aligned)
        good = page_aligned_blocks(bb, n, seed)
        raw = np.zeros(n * bb + 1, np.uint8)
        odd = raw[1:].reshape(n, bb)  # one byte past a page boundary
        src = [good[i] if a else odd[i] for i, a in enumerate(aligned)]
        for i, a in enumerate(aligned):
            if not a:
                odd[i] = good[i]
        keys = [bytes([i + 1]) * 16 for i in range(n)]
        assert tier.write(list(range(n)), keys, src) == [True] * n
        back = page_aligned_blocks(bb, n, seed + 1)
        raw2 = np.zeros(n * bb + 1, np.uint8)
        odd2 = raw2[1:].reshape(n, bb)
        dst = [back[i] if a else odd2[i] for i, a in enumerate(aligned)]
        assert tier.read(list(range(n)), keys, dst) == [True] * n
        assert all(np.array_equal(d, g) for d, g in zip(dst, good, strict=True))
    finally:
        tier.close()

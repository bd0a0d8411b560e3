"""The disk tier's native I/O loop (``kvbm_tiers_disk._native_io``): the same write order
and the same misses as the Python loop. Real slot files with O_DIRECT in tmp dirs; the
loop's checksum function is swapped for a Python callback where a test must hold a
block between its data write and its header."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from disk_aligned import blocks, make_tier, on_disk

from kvbm_tiers_disk import _native_io
from kvbm_tiers_disk import tier as tier_module

pytestmark = pytest.mark.skipif(_native_io.load() is None, reason="no C compiler: no native loop")


def header_on_disk(t: tier_module.DiskTier, slot: int) -> Any:
    return on_disk(t, slot)[0]


def test_aligned_blocks_go_through_the_native_loop_and_read_back_byte_exact(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        assert t._nio is not None
        src = blocks(t.block_bytes, 6, seed=1)
        keys = [bytes([i + 1]) * 16 for i in range(6)]
        assert t.write(list(range(6)), keys, src) == [True] * 6
        dst = blocks(t.block_bytes, 6, seed=2)
        assert t.read(list(range(6)), keys, dst) == [True] * 6
        assert all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))
        h = header_on_disk(t, 4)
        assert h is not None and h.key == keys[4] and h.checksum == xxhash.xxh3_64_intdigest(src[4])
    finally:
        t.close()


def test_a_block_is_neither_readable_nor_validly_headed_until_its_native_write_returns(
    tmp_path: Path,
) -> None:
    t = make_tier(tmp_path)
    try:
        bb = t.block_bytes
        old, new = blocks(bb, 2, seed=3)
        assert t.write([0], [b"A" * 16], [old]) == [True]
        assert t._nio is not None
        started, release = threading.Event(), threading.Event()

        @ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)
        def held_hash(addr: int, n: int) -> int:
            # The loop checksums a block after its data write and before its header.
            if n == bb:
                started.set()
                release.wait(10)
            return xxhash.xxh3_64_intdigest(ctypes.string_at(addr, n))

        t._nio = dataclasses.replace(t._nio, hash_ptr=ctypes.cast(held_hash, ctypes.c_void_p).value)
        result: list[list[bool]] = []
        w = threading.Thread(target=lambda: result.append(t.write([0], [b"C" * 16], [new])))
        w.start()
        try:
            assert started.wait(10), "the block's checksum was never computed"
            assert header_on_disk(t, 0) is None, "a valid header while the block is being written"
            out = blocks(bb, 1, seed=4)
            assert t.read([0], [b"A" * 16], out) == [False]
            assert t.read([0], [b"C" * 16], out) == [False]
        finally:
            release.set()
            w.join(10)
        assert result == [[True]]
        h = header_on_disk(t, 0)
        assert h is not None and h.key == b"C" * 16
        out = blocks(bb, 1, seed=4)
        assert t.read([0], [b"C" * 16], out) == [True] and np.array_equal(out[0], new)
    finally:
        t.close()


def test_a_flipped_byte_read_by_the_native_loop_is_a_miss(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        src = blocks(t.block_bytes, 3, seed=5)
        keys = [bytes([i + 1]) * 16 for i in range(3)]
        assert t.write([0, 1, 2], keys, src) == [True] * 3
        st, local = t._locate(2)
        off = t.geom.data_offset(local) + t.block_bytes - 1  # the very last byte
        with open(st.path, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x01]))
        dst = blocks(t.block_bytes, 3, seed=6)
        assert t.read([0, 1, 2], keys, dst) == [True, True, False]
        assert np.array_equal(dst[0], src[0]) and np.array_equal(dst[1], src[1])
        assert t.stats()["checksum_failures"] == 1
    finally:
        t.close()


def test_a_failed_native_data_write_leaves_no_header_and_a_counted_miss(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        st = t.stripes[0]
        good = st.fd
        st.fd = os.open(st.path, os.O_RDONLY)  # every pwrite now fails (EBADF)
        try:
            src = blocks(t.block_bytes, 2, seed=7)
            assert t.write([0, 1], [b"x" * 16, b"y" * 16], src) == [False, False]
        finally:
            os.close(st.fd)
            st.fd = good
        assert t.stats()["write_errors"] == 2
        assert header_on_disk(t, 0) is None and header_on_disk(t, 1) is None
        assert t.read([0], [b"x" * 16], blocks(t.block_bytes, 1, seed=8)) == [False]
    finally:
        t.close()
    t = make_tier(tmp_path)
    try:
        assert t.recover() == []
    finally:
        t.close()


def test_a_failed_native_read_is_a_counted_miss(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    try:
        src = blocks(t.block_bytes, 2, seed=9)
        keys = [b"p" * 16, b"q" * 16]
        assert t.write([0, 1], keys, src) == [True, True]
        st = t.stripes[0]
        good = st.fd
        st.fd = os.open(st.path, os.O_WRONLY)  # every pread now fails (EBADF)
        try:
            dst = blocks(t.block_bytes, 2, seed=10)
            assert t.read([0, 1], keys, dst) == [False, False]
        finally:
            os.close(st.fd)
            st.fd = good
        assert t.stats()["read_errors"] == 2
    finally:
        t.close()


def test_durable_native_writes_are_found_byte_exact_after_restart(tmp_path: Path) -> None:
    t = make_tier(tmp_path, durable=True)
    src = blocks(t.block_bytes, 5, seed=11)
    keys = [bytes([i + 10]) * 16 for i in range(5)]
    try:
        assert t.write(list(range(5)), keys, src) == [True] * 5
    finally:
        t.close()
    t = make_tier(tmp_path, durable=True)
    try:
        assert sorted(s for s, _ in t.recover()) == list(range(5))
        dst = blocks(t.block_bytes, 5, seed=12)
        assert t.read(list(range(5)), keys, dst) == [True] * 5
        assert all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        t.close()


def test_without_the_native_loop_the_tier_uses_its_python_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tier_module, "NATIVE_IO", False)
    t = make_tier(tmp_path)
    try:
        assert t._nio is None
        src = blocks(t.block_bytes, 3, seed=13)
        keys = [bytes([i + 1]) * 16 for i in range(3)]
        assert t.write([0, 1, 2], keys, src) == [True] * 3
        dst = blocks(t.block_bytes, 3, seed=14)
        assert t.read([0, 1, 2], keys, dst) == [True] * 3
        assert all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        t.close()


def test_batches_written_at_once_share_the_tiers_io_threads(tmp_path: Path) -> None:
    """Two batches in flight start at most ``io_threads - 1`` loop threads between them
    (the first takes them, the second runs on its caller alone), both land byte-exact,
    and the threads are free again for the next batch."""
    t = make_tier(tmp_path, n=12)
    try:
        assert t._nio is not None
        real = t._nio.write_fn
        threads: list[int] = []
        first_in, release = threading.Event(), threading.Event()

        def counting_write(k: int, *rest: Any) -> int:
            threads.append(k)
            if len(threads) == 1:
                first_in.set()
                release.wait(10)
            return int(real(k, *rest))

        t._nio = dataclasses.replace(t._nio, write_fn=counting_write)
        src = blocks(t.block_bytes, 12, seed=11)
        keys = [bytes([i + 1]) * 16 for i in range(12)]
        out: list[list[bool]] = []
        a = threading.Thread(target=lambda: out.append(t.write(list(range(4)), keys[:4], src[:4])))
        a.start()
        try:
            assert first_in.wait(10)
            assert t.write([4, 5, 6, 7], keys[4:8], src[4:8]) == [True] * 4
        finally:
            release.set()
            a.join(10)
        assert out == [[True] * 4]
        assert t.write([8, 9, 10, 11], keys[8:], src[8:]) == [True] * 4
        assert threads == [4, 1, 4], threads
        dst = blocks(t.block_bytes, 12, seed=12)
        assert t.read(list(range(12)), keys, dst) == [True] * 12
        assert all(np.array_equal(x, y) for x, y in zip(src, dst, strict=True))
    finally:
        t.close()

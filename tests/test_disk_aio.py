"""The disk tier's native loop through the kernel's AIO (``_native_io.AIO``): each
thread checksums a block while that block's own write is in flight, and reads the next
block while it checksums the one that arrived. Same bytes and same misses as with
pread/pwrite (every test runs both ways). Real slot files with O_DIRECT in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xxhash
from disk_aligned import blocks, on_disk
from disk_aligned import make_tier as aligned_tier

from kvbm_tiers_disk import _native_io
from kvbm_tiers_disk.tier import DiskTier

pytestmark = pytest.mark.skipif(_native_io.load() is None, reason="no C compiler: no native loop")


def make_tier(path: Path, aio: bool, n: int = 8, threads: int = 1) -> DiskTier:
    t = aligned_tier(path, n, io_threads=threads)
    t._aio = aio
    return t


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
@pytest.mark.parametrize("threads", [1, 3])
def test_every_header_holds_the_checksum_of_the_bytes_on_disk_and_reads_back_byte_exact(
    tmp_path: Path, aio: bool, threads: int,
) -> None:
    t = make_tier(tmp_path, aio, threads=threads)
    try:
        src = blocks(t.block_bytes, 8, seed=1)
        keys = [bytes([i + 1]) * 16 for i in range(8)]
        assert t.write(list(range(8)), keys, src) == [True] * 8
        for s in range(8):
            h, data = on_disk(t, s)
            assert h is not None and h.key == keys[s]
            assert data == src[s].tobytes() and h.checksum == xxhash.xxh3_64_intdigest(data)
        dst = blocks(t.block_bytes, 8, seed=2)
        assert t.read(list(range(8)), keys, dst) == [True] * 8
        assert all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))
        # Every data request went through AIO (8 writes, 8 reads), or none did.
        assert t.stats()["async_requests"] == (16 if aio else 0)
    finally:
        t.close()


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
@pytest.mark.parametrize("bad", [0, 4, 7])
def test_a_flipped_byte_in_a_pipelined_read_misses_that_block_alone(
    tmp_path: Path, aio: bool, bad: int,
) -> None:
    """One thread reads block i+1 while it checksums block i: each verdict must be its
    own block's (a checksum taken over the wrong buffer or paired with the wrong block
    misses the wrong one, or lets the bad one through)."""
    t = make_tier(tmp_path, aio, threads=1)
    try:
        src = blocks(t.block_bytes, 8, seed=3)
        keys = [bytes([i + 1]) * 16 for i in range(8)]
        assert t.write(list(range(8)), keys, src) == [True] * 8
        st, local = t._locate(bad)
        off = t.geom.data_offset(local) + t.block_bytes // 2
        with open(st.path, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x80]))
        dst = blocks(t.block_bytes, 8, seed=4)
        want = [i != bad for i in range(8)]
        assert t.read(list(range(8)), keys, dst) == want
        assert all(np.array_equal(src[i], dst[i]) for i in range(8) if i != bad)
        assert t.stats()["checksum_failures"] == 1
    finally:
        t.close()


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
def test_a_read_cut_short_by_a_truncated_file_is_a_counted_miss(tmp_path: Path, aio: bool) -> None:
    t = make_tier(tmp_path, aio, n=4, threads=1)
    try:
        src = blocks(t.block_bytes, 4, seed=5)
        keys = [bytes([i + 1]) * 16 for i in range(4)]
        assert t.write([0, 1, 2, 3], keys, src) == [True] * 4
        st, local = t._locate(3)
        # The file now ends halfway through slot 3's data (the tier looked at its files
        # during the write above, so this read does not look again first).
        os.truncate(st.path, t.geom.data_offset(local) + t.block_bytes // 2)
        dst = blocks(t.block_bytes, 4, seed=6)
        assert t.read([0, 1, 2, 3], keys, dst) == [True, True, True, False]
        assert all(np.array_equal(src[i], dst[i]) for i in range(3))
        assert t.stats()["short_reads"] == 1
    finally:
        t.close()


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
def test_a_refused_data_write_leaves_no_header_and_the_slot_a_miss(tmp_path: Path, aio: bool) -> None:
    t = make_tier(tmp_path, aio, n=4, threads=2)  # fresh slots: no header to invalidate first
    try:
        st = t.stripes[0]
        good = st.fd
        st.fd = os.open(st.path, os.O_RDONLY)  # every data write now fails (EBADF)
        try:
            src = blocks(t.block_bytes, 4, seed=7)
            assert t.write([0, 1, 2, 3], [b"z" * 16] * 4, src) == [False] * 4
        finally:
            os.close(st.fd)
            st.fd = good
        assert t.stats()["write_errors"] == 4 and t.stats()["async_requests"] == 0
        assert all(on_disk(t, s)[0] is None for s in range(4))
        assert t.read([0], [b"z" * 16], blocks(t.block_bytes, 1, seed=8)) == [False]
    finally:
        t.close()


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
def test_a_data_write_cut_short_leaves_no_header_and_the_next_blocks_headers_are_theirs(
    tmp_path: Path, aio: bool,
) -> None:
    """RLIMIT_FSIZE cuts slot 2's data write short (with AIO its completion reports fewer
    bytes) and refuses slot 3's: with AIO the thread has submitted the next block's data
    before it writes (or, here, withholds) a block's header."""
    import resource
    import signal

    t = make_tier(tmp_path, aio, n=4, threads=1)
    src = blocks(t.block_bytes, 4, seed=9)
    st, local = t._locate(2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (t.geom.data_offset(local) + t.block_bytes // 2, hard))
        try:
            ok = t.write([0, 1, 2, 3], [bytes([k]) * 16 for k in range(4)], src)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert ok == [True, True, False, False]
        assert t.stats()["write_errors"] == 2
        # With AIO slot 2's short write and slot 3's refusal came back as completions.
        assert t.stats()["async_requests"] == (4 if aio else 0)
        for s in (0, 1):
            h, data = on_disk(t, s)
            assert h is not None and h.key == bytes([s]) * 16 and h.slot == s
            assert h.checksum == xxhash.xxh3_64_intdigest(data) and data == src[s].tobytes()
        assert on_disk(t, 2)[0] is None and on_disk(t, 3)[0] is None
        out = blocks(t.block_bytes, 4, seed=10)
        assert t.read([0, 1, 2, 3], [bytes([k]) * 16 for k in range(4)], out) == [True, True, False, False]
        assert out[0].tobytes() == src[0].tobytes() and out[1].tobytes() == src[1].tobytes()
    finally:
        signal.signal(signal.SIGXFSZ, old)
        t.close()


def test_a_forked_child_moves_its_blocks_through_its_own_aio_contexts(tmp_path: Path) -> None:
    """The loop keeps AIO contexts for the process's life; a child forked after the
    parent used some must not reuse the parent's (they are not the child's: every
    submit would be refused and the child would run without AIO)."""
    parent = make_tier(tmp_path / "parent", True, threads=2)
    try:
        src = blocks(parent.block_bytes, 8, seed=10)
        keys = [bytes([i + 1]) * 16 for i in range(8)]
        assert parent.write(list(range(8)), keys, src) == [True] * 8
        assert parent.stats()["async_requests"] == 8  # the pool now holds contexts
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if every block went through AIO
            code = 1
            try:
                child = make_tier(tmp_path / "child", True, threads=2)
                ok = child.write(list(range(8)), keys, src)
                dst = blocks(child.block_bytes, 8, seed=11)
                got = child.read(list(range(8)), keys, dst)
                same = all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))
                if ok == got == [True] * 8 and same and child.stats()["async_requests"] == 16:
                    code = 0
                child.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        parent.close()

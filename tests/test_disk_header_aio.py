"""The native loop's header writes through AIO: a block's header is submitted once its
data write is complete and reaped with the next block's data (or before the call
returns); a recycled slot's invalidation is submitted while the block before it is in
flight and complete before its data is submitted. What must hold: a header the kernel
fails misses that block alone, and a process killed between a block's data and its
header leaves that slot a miss after recovery, never the old block and never a header
over other data. Real slot files with O_DIRECT in tmp dirs; every fault is the
kernel's."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import resource
import select
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import xxhash
from disk_aligned import blocks, make_tier, on_disk

from kvbm_tiers_disk import _native_io
from kvbm_tiers_disk.format import Geometry
from kvbm_tiers_disk.tier import DiskTier

pytestmark = pytest.mark.skipif(_native_io.load() is None, reason="no C compiler: no native loop")


@dataclasses.dataclass(frozen=True)
class MovedHeader(Geometry):
    """Slot ``bad``'s header written at ``to`` instead (the data stays where it is)."""

    bad: int = -1
    to: int = 0

    def header_offset(self, local: int) -> int:
        return self.to if local == self.bad else super().header_offset(local)


@contextmanager
def header_fails(t: DiskTier, slot: int, how: str) -> Iterator[None]:
    """The kernel fails ``slot``'s header write: ``refused`` (a negative offset: io_submit
    and pwrite refuse it with EINVAL) or ``efbig`` (past RLIMIT_FSIZE: accepted by
    io_submit, failed on completion; pwrite fails it at once)."""
    st = t.stripes[0]
    assert len(t.stripes) == 1
    real = t.geom
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        if how == "refused":
            t.geom = MovedHeader(t.block_bytes, slot, -4096)
        else:
            size = os.fstat(st.fd).st_size
            t.geom = MovedHeader(t.block_bytes, slot, size + (1 << 20))
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
        t.geom = real


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
@pytest.mark.parametrize("how", ["refused", "efbig"])
@pytest.mark.parametrize(("threads", "bad"), [(1, 0), (1, 5), (1, 7), (3, 4)])
def test_a_failed_header_write_misses_that_block_alone_before_and_after_restart(
    tmp_path: Path, aio: bool, how: str, threads: int, bad: int,
) -> None:
    """Block ``bad``'s header fails (the first, a middle one, the last: reaped only at
    the end of the call); its data was written. It must be a counted miss now and
    after a restart; every other block reads back byte-exact both times."""
    t = make_tier(tmp_path, 8, io_threads=threads)
    src = blocks(t.block_bytes, 8, seed=21)
    keys = [bytes([k + 1]) * 16 for k in range(8)]
    want = [k != bad for k in range(8)]
    try:
        t._aio = aio
        with header_fails(t, bad, how):
            assert t.write(list(range(8)), keys, src) == want
        assert t.stats()["write_errors"] == 1
        assert t.stats()["async_requests"] == (8 if aio else 0)
        assert on_disk(t, bad)[0] is None
        dst = blocks(t.block_bytes, 8, seed=22)
        assert t.read(list(range(8)), keys, dst) == want
        assert all(np.array_equal(src[k], dst[k]) for k in range(8) if k != bad)
    finally:
        t.close()
    t = make_tier(tmp_path, 8, io_threads=threads)
    try:
        assert sorted(s for s, _ in t.recover()) == [k for k in range(8) if k != bad]
        dst = blocks(t.block_bytes, 8, seed=23)
        assert t.read(list(range(8)), keys, dst) == want
        assert all(np.array_equal(src[k], dst[k]) for k in range(8) if k != bad)
    finally:
        t.close()


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
def test_every_header_of_a_batch_is_on_disk_when_the_write_returns(tmp_path: Path, aio: bool) -> None:
    """With AIO the last block's header is still in flight after its data: the call
    reaps it before returning, so each header is on disk, names its block and holds
    the checksum of the bytes beside it (over recycled slots: each invalidated first)."""
    t = make_tier(tmp_path, 16, io_threads=3)
    try:
        t._aio = aio
        for rnd in range(3):
            src = blocks(t.block_bytes, 16, seed=30 + rnd)
            keys = [bytes([rnd, k]) * 8 for k in range(16)]
            assert t.write(list(range(16)), keys, src) == [True] * 16
            for s in range(16):
                h, data = on_disk(t, s)
                assert h is not None and h.key == keys[s] and h.slot == s
                assert data == src[s].tobytes() and h.checksum == xxhash.xxh3_64_intdigest(data)
        assert t.stats()["write_errors"] == 0
    finally:
        t.close()


def _killed_mid_batch(path: Path, aio: bool, old: list[np.ndarray], new: list[np.ndarray],
                      keys: list[bytes], at: int) -> None:
    """A child process overwrites slots 0-7 with ``new`` (keys ``keys``) on one thread
    and is killed (SIGKILL) while block ``at``'s data write has been submitted: its
    invalidation done, its header not yet written."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            t = make_tier(path, 8, io_threads=1)
            t._aio = aio
            assert t._nio is not None
            bb, calls = t.block_bytes, [0]

            @ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t)
            def hash_then_hang(addr: int, n: int) -> int:
                if n == bb:  # a block's data checksum (not a header's seal)
                    if calls[0] == at:
                        os.write(w, b"x")
                        time.sleep(60)
                    calls[0] += 1
                return xxhash.xxh3_64_intdigest(ctypes.string_at(addr, n))

            t._nio = dataclasses.replace(t._nio, hash_ptr=ctypes.cast(hash_then_hang, ctypes.c_void_p).value)
            t.write(list(range(8)), keys, new)
        finally:
            os._exit(3)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready and os.read(r, 1) == b"x", "the child never reached the block"
        time.sleep(0.2)  # its data write completes (or not: either way no header)
        os.kill(pid, signal.SIGKILL)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "pread-pwrite"])
@pytest.mark.parametrize("at", [0, 3, 7])
@pytest.mark.parametrize("slots", ["recycled", "fresh"])
def test_a_process_killed_between_a_blocks_data_and_its_header_leaves_that_slot_a_miss(
    tmp_path: Path, aio: bool, at: int, slots: str,
) -> None:
    """Slots 0-7 hold blocks A (``recycled``; ``fresh``: nothing, a new file); a process
    writing blocks B into them is killed after block ``at``'s data and before its
    header. After recovery slot ``at`` holds nothing (not A: its header was invalidated
    before B's data; not B: no header); any other slot recovered (B before ``at``, A
    after it: their headers may or may not have landed, an invalidation may have)
    reads back byte-exact what it names."""
    t = make_tier(tmp_path, 8, io_threads=1)
    old = blocks(t.block_bytes, 8, seed=41)
    new = blocks(t.block_bytes, 8, seed=42)
    a_keys = [b"A" * 8 + bytes([k]) * 8 for k in range(8)]
    b_keys = [b"B" * 8 + bytes([k]) * 8 for k in range(8)]
    try:
        if slots == "recycled":
            assert t.write(list(range(8)), a_keys, old) == [True] * 8
    finally:
        t.close()
    _killed_mid_batch(tmp_path, aio, old, new, b_keys, at)
    t = make_tier(tmp_path, 8, io_threads=1)
    try:
        found = dict(t.recover())
        assert at not in found, f"slot {at} recovered as {bytes(found.get(at, b''))!r}"
        by_key = {**{k: old[s] for s, k in enumerate(a_keys)}, **{k: new[s] for s, k in enumerate(b_keys)}}
        for s, key in found.items():
            assert bytes(key) in (a_keys[s], b_keys[s])
            assert (bytes(key) == b_keys[s]) == (s < at), f"slot {s}: {bytes(key)!r}"
            dst = blocks(t.block_bytes, 1, seed=43)
            assert t.read([s], [key], dst) == [True]
            assert np.array_equal(dst[0], by_key[bytes(key)])
        assert t.read([at], [a_keys[at]], blocks(t.block_bytes, 1, seed=44)) == [False]
        assert t.read([at], [b_keys[at]], blocks(t.block_bytes, 1, seed=44)) == [False]
    finally:
        t.close()


def test_a_never_written_slot_takes_its_zeroed_header_page_with_its_data_a_recycled_one_an_invalidation(
    tmp_path: Path,
) -> None:
    """What the glue hands the loop per block: 2 (a zeroed header page and the data in
    one request) only into a slot of a file this tier created and never wrote; 1
    (invalidate first) where a header may be live; 0 into a slot of an existing file
    whose header was found invalid. Each write reads back byte-exact."""
    seen: list[list[int]] = []

    def spy(t: DiskTier) -> None:
        assert t._nio is not None
        real = t._nio.write_fn

        def write_fn(k: int, m: int, c: int, *rest: int) -> int:
            seen.append(list(np.ctypeslib.as_array((ctypes.c_int64 * m).from_address(rest[5]))))
            return int(real(k, m, c, *rest))

        t._nio = dataclasses.replace(t._nio, write_fn=write_fn)

    src = blocks(8192, 8, seed=51)
    keys = [bytes([k + 1]) * 16 for k in range(8)]
    t = make_tier(tmp_path, 8, io_threads=2)
    try:
        spy(t)
        assert t.write([0, 1, 2, 3], keys[:4], src[:4]) == [True] * 4  # new file
        assert t.write([2, 3], keys[4:6], src[4:6]) == [True] * 2  # headers live
    finally:
        t.close()
    t = make_tier(tmp_path, 8, io_threads=2)
    try:
        spy(t)
        assert t.write([4, 5, 0], [keys[6], keys[7], keys[0]], [src[6], src[7], src[0]]) == [True] * 3
        assert seen == [[2, 2, 2, 2], [1, 1], [0, 0, 1]]
        want = [src[0], src[1], src[4], src[5], src[6], src[7]]
        dst = blocks(8192, 6, seed=52)
        got = t.read([0, 1, 2, 3, 4, 5], [keys[0], keys[1], keys[4], keys[5], keys[6], keys[7]], dst)
        assert got == [True] * 6
        assert all(np.array_equal(a, b) for a, b in zip(want, dst, strict=True))
        assert all(on_disk(t, s)[0] is not None for s in range(6))
    finally:
        t.close()

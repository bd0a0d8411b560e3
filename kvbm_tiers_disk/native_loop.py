"""The disk tier's glue to the native per-block loop (``_native_io``): which blocks it
takes, their offsets and headers packed into arrays, the threads a batch may start,
and each block's outcome put back into the index and the counters exactly as the
Python loop (``pyloop.py``) keeps them."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

import numpy as np

from kvbm.blockfile import HEADER_BYTES, HEADER_USED, BlockHeader, pack_header
from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty

from . import _native_io
from .base import _ZERO_PAGE, TierBase


class NativeLoop(TierBase):
    """A batch's aligned blocks written or read by one call into the C loop."""

    def _split(self, bufs: Sequence[np.ndarray]) -> tuple[list[int], list[int]]:
        """Blocks the native loop takes (the buffer handed to the kernel as is) and the
        rest (bounce buffers, a wrong size: the Python loop, which also says why)."""
        if self._nio is None:
            return [], list(range(len(bufs)))
        fast: list[int] = []
        rest: list[int] = []
        bb = self.block_bytes
        for i, b in enumerate(bufs):
            (fast if b.nbytes == bb and self._direct_ok(b) else rest).append(i)
        return fast, rest

    def _headers(self, n: int) -> np.ndarray:
        """This thread's header pages for a batch of ``n`` (zero past each header's end)."""
        h = self._tls.headers
        if h is None or h.size < n * HEADER_BYTES:
            h = self._tls.headers = aligned_empty(max(n, 64) * HEADER_BYTES)
        return h

    def _native_call(self, fn: Callable[[int, int], object], n: int) -> int:
        """``fn(threads, counter address)``: one call, this thread and up to
        ``min(io_threads, n) - 1`` more started in C, taking blocks from the shared
        counter. The extra threads come from the tier's spare count, so all batches in
        flight together start at most ``io_threads - 1`` (a batch that finds none runs
        on its caller's thread alone). The loop counts the blocks it moved through the
        kernel's AIO (their checksum overlapped with their own transfer) into
        ``async_requests``. Returns the threads used."""
        with self._spare_lock:
            extra = min(min(self.cfg.io_threads, n) - 1, self._spare_threads)
            self._spare_threads -= extra
        try:
            counter = np.zeros(2, np.int64)  # the shared block counter; blocks moved by AIO
            fn(extra + 1, counter.ctypes.data)
            self._add(async_requests=int(counter[1]))
        finally:
            with self._spare_lock:
                self._spare_threads += extra
        return extra + 1

    def _native_write(
        self, idx: list[int], slots: Sequence[int], keys: Sequence[SequenceHash],
        src: Sequence[np.ndarray], sums: list[int | None], ok: list[bool], headers: bool,
    ) -> None:
        """Blocks ``idx`` of a batch through the native loop: invalidate (or, into a
        slot never written, a zeroed header page with the data), data, checksum,
        header (``headers``; else the caller syncs and writes them); results into
        ``sums`` and ``ok``, the index and the counters as the Python loop keeps them."""
        nio = self._nio
        assert nio is not None
        m = len(idx)
        geom = self.geom
        fd, buf, ln, doff, hoff, inval = (np.empty(m, np.int64) for _ in range(6))
        flat = [src[i].reshape(-1) for i in idx]  # alive until the call returns
        where = [self._locate(slots[i]) for i in idx]
        fresh = self._fresh
        for j, i in enumerate(idx):
            st, local = where[j]
            self._keys[slots[i]] = None
            fd[j], buf[j], ln[j] = st.fd, flat[j].ctypes.data, flat[j].nbytes
            doff[j], hoff[j] = geom.data_offset(local), geom.header_offset(local)
            # 1: invalidate the old header first; 2: a slot never written (its header
            # page zeros on disk): the data goes with a zeroed header page in one
            # request, so the file's unwritten extent is converted once, and the header
            # written after it overwrites written space.
            live = self._hdr_live[slots[i]]
            inval[j] = live or (2 if fresh[slots[i]] and doff[j] == hoff[j] + HEADER_BYTES
                                else 0)
        hdr = self._headers(m) if headers else None
        if hdr is not None:
            with self._lock:
                seq0 = self._seq + 1
                self._seq += m
            mv = memoryview(hdr)
            for j, i in enumerate(idx):
                pack_header(mv[j * HEADER_BYTES : (j + 1) * HEADER_BYTES],
                            BlockHeader(bytes(keys[i]), self._ns, self._layout, self.block_bytes,
                                        0, seq0 + j, slots[i]))
        out = np.zeros(m, np.uint64)
        status = np.full(m, -1, np.int64)
        hp = 0 if hdr is None else hdr.ctypes.data
        args = (fd.ctypes.data, buf.ctypes.data, ln.ctypes.data, doff.ctypes.data,
                hoff.ctypes.data, inval.ctypes.data, self.block_bytes, _ZERO_PAGE.ctypes.data,
                hp, HEADER_BYTES, nio.sum_at, HEADER_USED - 8, nio.hash_ptr,
                out.ctypes.data, status.ctypes.data, int(self._aio))
        self._native_call(lambda k, c: nio.write_fn(k, m, c, *args), m)
        for j, i in enumerate(idx):
            slot, code = slots[i], int(status[j])
            st = where[j][0]
            stage, err = code >> 32, code & 0xFFFFFFFF
            if code == 0:
                sums[i] = int(out[j])
                ok[i] = True
                if headers:
                    self._hdr_live[slot] = 1
                    self._keys[slot] = bytes(keys[i])
                    self._sums[slot] = int(out[j])
                else:
                    self._hdr_live[slot] = 0
            elif stage == _native_io.HEADER:
                self._hdr_live[slot] = 1  # it may be valid on disk now
                self._fault("write_errors", OSError(err or errno.ENOSPC, os.strerror(err) if err
                                                    else "short write of a header"),
                            "header write of slot %d to %s failed", slot, st.path)
            else:
                if stage == _native_io.DATA:
                    self._hdr_live[slot] = 0
                why = os.strerror(err) if err else "short write of " + (
                    "block data" if stage == _native_io.DATA else "a header")
                self._fault("write_errors", OSError(err or (errno.ENOSPC if stage == _native_io.DATA
                                                           else errno.EIO), why),
                            "write of slot %d to %s failed", slot, st.path)

    def _native_read(
        self, idx: list[int], slots: Sequence[int], keys: Sequence[SequenceHash],
        dst: Sequence[np.ndarray], ok: list[bool],
    ) -> None:
        """Blocks ``idx`` of a batch read by the native loop straight into their
        buffers; a block is good only if its bytes give the checksum the index held for
        the slot before the read (a slot without the key is not read at all)."""
        nio = self._nio
        assert nio is not None
        todo: list[int] = []
        for i in idx:
            if self._keys[slots[i]] != keys[i]:
                self._fault("key_mismatches", None, "slot %d does not hold the requested block",
                            slots[i])
            else:
                todo.append(i)
        m = len(todo)
        if not m:
            return
        want = [self._sums[slots[i]] for i in todo]
        geom = self.geom
        fd, buf, ln, off = (np.empty(m, np.int64) for _ in range(4))
        flat = [dst[i].reshape(-1) for i in todo]
        where = [self._locate(slots[i]) for i in todo]
        for j in range(m):
            st, local = where[j]
            fd[j], buf[j], ln[j] = st.fd, flat[j].ctypes.data, flat[j].nbytes
            off[j] = geom.data_offset(local)
        out = np.zeros(m, np.uint64)
        status = np.full(m, -1, np.int64)
        args = (fd.ctypes.data, buf.ctypes.data, ln.ctypes.data, off.ctypes.data,
                self.block_bytes, nio.hash_ptr, out.ctypes.data, status.ctypes.data,
                int(self._aio))
        self._native_call(lambda k, c: nio.read_fn(k, m, c, *args), m)
        for j, i in enumerate(todo):
            slot, code, path = slots[i], int(status[j]), where[j][0].path
            err = code & 0xFFFFFFFF
            if code == 0:
                if int(out[j]) == want[j]:
                    ok[i] = True
                else:
                    self._fault("checksum_failures", None, "slot %d in %s failed its checksum",
                                slot, path)
            elif err:
                self._fault("read_errors", OSError(err, os.strerror(err)),
                            "read of slot %d from %s failed", slot, path)
            else:
                self._fault("short_reads", None, "read of slot %d from %s returned %d of %d bytes "
                            "(file truncated?)", slot, path, int(out[j]), int(ln[j]))

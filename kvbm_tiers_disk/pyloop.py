"""The disk tier's Python I/O loop: one block per call, on the worker pool.

It takes every block the native loop (``native_loop.py``) cannot: buffers that need a
bounce copy, a wrong size, a process without a C compiler, and ``durable: true``'s
headers after the sync. ``os.preadv``/``os.pwritev`` and the checksum release the GIL
between its steps. Write order per block: invalidate the old header if it may be
valid, write the data, checksum the bytes written, write the new header.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import numpy as np

from kvbm.blockfile import HEADER_BYTES, BlockHeader, pack_header
from kvbm.hashing import SequenceHash

from ._xxh import xxh3_64
from .base import _ZERO_PAGE, TierBase


class PythonLoop(TierBase):
    """Per-block write, header and read on the worker pool's threads."""

    def _sync_then_headers(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], sums: list[int | None], ok: list[bool]
    ) -> list[bool]:
        for st in {self._locate(s)[0].index: self._locate(s)[0] for s, g in zip(slots, ok, strict=True) if g}.values():
            try:
                os.fdatasync(st.fd)
            except OSError as e:
                self._fault("write_errors", e, "fdatasync of %s failed", st.path)
                return [False] * len(ok)

        def header(i: int) -> bool:
            s = sums[i]
            return ok[i] and s is not None and self._write_header(slots[i], keys[i], s)

        return self._run(header, len(slots))

    def _write_data(self, slot: int, key: bytes, src: np.ndarray) -> int | None:
        """Invalidate the old header, write the data; return its checksum, None on failure."""
        st, local = self._locate(slot)
        self._keys[slot] = None
        try:
            if self._hdr_live[slot]:
                if os.pwritev(st.fd, [_ZERO_PAGE], self.geom.header_offset(local)) != HEADER_BYTES:
                    raise OSError(errno.EIO, "short write of a header")
                self._hdr_live[slot] = 0
            src = src.reshape(-1)
            if src.nbytes != self.block_bytes:
                raise ValueError(f"block of {src.nbytes} bytes, expected {self.block_bytes}")
            if self._direct_ok(src):
                buf = src
            else:
                buf = self._bounce()
                np.copyto(buf[: self.block_bytes], src)
                if not self.o_direct:
                    buf = buf[: self.block_bytes]
            if os.pwritev(st.fd, [buf], self.geom.data_offset(local)) != buf.nbytes:
                raise OSError(errno.ENOSPC, "short write of block data")
            # The checksum of the bytes handed to the kernel (a bounce copy, or the
            # caller's block itself), in this I/O thread with the GIL released.
            return xxh3_64(buf[: self.block_bytes])
        except (OSError, ValueError) as e:
            self._fault("write_errors", e, "write of slot %d to %s failed", slot, st.path)
            return None

    def _write_header(self, slot: int, key: bytes, checksum: int) -> bool:
        st, local = self._locate(slot)
        buf = self._header_buf()
        h = BlockHeader(bytes(key), self._ns, self._layout, self.block_bytes, checksum,
                        self._next_seq(), slot)
        pack_header(memoryview(buf), h)
        # From here on the header may be valid on disk, even if the write reports failure.
        self._hdr_live[slot] = 1
        try:
            if os.pwritev(st.fd, [buf], self.geom.header_offset(local)) != HEADER_BYTES:
                raise OSError(errno.ENOSPC, "short write of a header")
        except OSError as e:
            self._fault("write_errors", e, "header write of slot %d to %s failed", slot, st.path)
            return False
        self._keys[slot] = bytes(key)
        self._sums[slot] = checksum
        return True

    def _read_one(self, slot: int, key: bytes, dst: np.ndarray | None) -> bool:
        st, local = self._locate(slot)
        if self._keys[slot] != key:
            self._fault("key_mismatches", None, "slot %d does not hold the requested block", slot)
            return False
        want = self._sums[slot]
        bb = self.block_bytes
        try:
            flat = None if dst is None else dst.reshape(-1)
            if flat is not None and flat.nbytes != bb:
                raise ValueError(f"buffer of {flat.nbytes} bytes, expected {bb}")
            if flat is not None and self._direct_ok(flat):
                buf = flat
            else:
                buf = self._bounce() if self.o_direct else self._bounce()[:bb]
            got = os.preadv(st.fd, [buf], self.geom.data_offset(local))
        except (OSError, ValueError) as e:
            self._fault("read_errors", e, "read of slot %d from %s failed", slot, st.path)
            return False
        if got != buf.nbytes:
            self._fault("short_reads", None, "read of slot %d from %s returned %d of %d bytes "
                        "(file truncated?)", slot, st.path, got, buf.nbytes)
            return False
        data = buf[:bb]
        if xxh3_64(data) != want:
            self._fault("checksum_failures", None, "slot %d in %s failed its checksum", slot, st.path)
            return False
        if flat is not None and buf is not flat:
            np.copyto(flat, data)
        return True

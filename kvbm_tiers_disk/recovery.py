"""The disk tier's start-up scan of slot headers, and slot files removed or truncated
underneath a running tier."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from kvbm.blockfile import HEADER_BYTES, unpack_header
from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash

from .base import TierBase, log
from .files import FileOptions, StripeFile, _fallocate, open_stripe
from .format import Superblock


class Recovery(TierBase):
    """``recover`` (the index from the slot headers) and ``check_files``."""

    def recover(self) -> list[tuple[int, SequenceHash]]:
        """Scan every slot header once; return (slot, key) of the intact blocks.

        Only the 4 KiB headers are read (in parallel), not the data: the write order
        guarantees that a valid header describes completely written data, and every
        read checks the data's checksum anyway.
        """
        if self._recovered is not None:
            return list(self._recovered)
        t0 = time.perf_counter()
        n = len(self.stripes)
        jobs: list[tuple[StripeFile, int, int]] = []
        chunk = max(64, -(-self.num_slots // (self.cfg.recover_threads * 4)))
        for st in self.stripes:
            for lo in range(0, st.num_local, chunk):
                jobs.append((st, lo, min(st.num_local, lo + chunk)))
        found: dict[bytes, tuple[int, int, int]] = {}  # key -> (seq, slot, checksum)
        invalid = 0
        threads = min(self.cfg.recover_threads, max(1, len(jobs)))
        with ThreadPoolExecutor(threads, thread_name_prefix=f"kvbm-{self.name}-scan") as pool:
            for part, bad in pool.map(lambda j: self._scan(j[0], j[1], j[2], n), jobs):
                invalid += bad
                for key, seq, slot, csum in part:
                    prev = found.get(key)
                    # The same key in two slots (an evicted copy whose header was not yet
                    # overwritten): the later write wins.
                    if prev is None or seq > prev[0]:
                        found[key] = (seq, slot, csum)
        out: list[tuple[int, SequenceHash]] = []
        max_seq = 0
        for key, (seq, slot, csum) in found.items():
            self._keys[slot] = key
            self._sums[slot] = csum
            max_seq = max(max_seq, seq)
            out.append((slot, SequenceHash(key)))
        self._seq = max(self._seq, max_seq + 1)
        if self.cfg.verify_on_recover and out:
            ok = self.read([s for s, _ in out], [k for _, k in out], None)
            out = [sk for sk, g in zip(out, ok, strict=True) if g]
        dt = time.perf_counter() - t0
        self.recover_stats = {
            "recovered_blocks": len(out),
            "scanned_slots": self.num_slots,
            "invalid_headers": invalid,
            "recover_seconds": dt,
            "recover_slots_per_s": self.num_slots / dt if dt > 0 else 0.0,
        }
        if out:
            log.info("kvbm disk tier %r: found %d blocks in %d slots in %.3fs",
                     self.name, len(out), self.num_slots, dt)
        self._recovered = out
        return list(out)

    def _scan(self, st: StripeFile, lo: int, hi: int, nstripes: int) -> tuple[list[tuple[bytes, int, int, int]], int]:
        buf = self._header_buf()
        mv = memoryview(buf)
        out: list[tuple[bytes, int, int, int]] = []
        invalid = 0
        fd = st.fd
        geom = self.geom
        ns, layout, bb = self._ns, self._layout, self.block_bytes
        live = self._hdr_live
        for local in range(lo, hi):
            slot = local * nstripes + st.index
            try:
                got = os.preadv(fd, [buf], geom.header_offset(local))
            except OSError as e:
                self._fault("read_errors", e, "scanning slot %d of %s", slot, st.path)
                continue
            h = unpack_header(mv) if got == HEADER_BYTES else None
            if h is None:
                live[slot] = 0
                if got == HEADER_BYTES and buf[:4].any():
                    invalid += 1
                continue
            # A valid header names a block of this namespace and layout, in this slot.
            if h.namespace != ns or h.layout != layout or h.length != bb or h.slot != slot:
                invalid += 1
                continue
            out.append((h.key, h.seq, slot, h.checksum))
        return out, invalid

    # -- the files underneath ----------------------------------------------------
    def check_files(self) -> None:
        """Look now for a slot file removed or truncated underneath (the data path
        looks at most once a second, and after any failed read)."""
        self._check_files(force=True)

    def _check_files(self, force: bool = False) -> None:
        """Notice a slot file removed or truncated underneath; drop what it lost.

        Checked at most once a second (an fstat per file) and after any failed read.
        """
        now = time.monotonic()
        if not force and now - self._last_check < 1.0:
            return
        # One checker at a time; others go on with their I/O rather than wait.
        if not self._check_lock.acquire(blocking=False):
            return
        try:
            self._last_check = now
            self._check_stripes()
        finally:
            self._check_lock.release()

    def _check_stripes(self) -> None:
        n = len(self.stripes)
        for st in self.stripes:
            try:
                info = os.fstat(st.fd)
            except OSError as e:
                self._fault("read_errors", e, "fstat of %s failed", st.path)
                continue
            if info.st_nlink == 0:
                self._recreate(st, n)
            elif info.st_size < st.size:
                self._fault("files_truncated", None, "%s was truncated to %d bytes underneath; "
                            "blocks past the end are dropped", st.path, info.st_size)
                whole = self.geom.slots_in(info.st_size)
                for local in range(whole, st.num_local):
                    s = local * n + st.index
                    self._keys[s] = None
                    self._hdr_live[s] = 0
                try:
                    # Reserve the space again so later writes do not hit ENOSPC midway.
                    os.ftruncate(st.fd, st.size)
                    _fallocate(st.fd, 0, st.size)
                except OSError as e:
                    self._fault("write_errors", e, "re-extending %s failed", st.path)

    def _recreate(self, st: StripeFile, nstripes: int) -> None:
        self._fault("files_recreated", None, "%s was removed underneath; its blocks are lost, "
                    "starting a new file", st.path)
        for local in range(st.num_local):
            s = local * nstripes + st.index
            self._keys[s] = None
            self._hdr_live[s] = 0
        sb = Superblock(self._ns, self._layout, self.block_bytes, self.geom.stride, st.index, nstripes)
        opts = FileOptions(self.o_direct, self.cfg.allocator_type, self.cfg.zerofill_fallback)
        try:
            new, _ = open_stripe(self.name, st.path, sb, self.geom, st.num_local, opts)
        except (ConfigError, OSError) as e:
            self._fault("write_errors", e, "re-creating %s failed", st.path)
            return
        # Keep the old descriptor open until close(): a worker may still be using it.
        st.retired.append(st.fd)
        st.fd = new.fd

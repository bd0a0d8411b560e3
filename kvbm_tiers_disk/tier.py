"""The disk tier (G3): preallocated slot files read and written with O_DIRECT.

Slots are striped across one file per configured directory (slot ``s`` lives in
stripe ``s % n`` at local index ``s // n``), so several devices serve one batch.
A batch is split across ``io_threads`` threads, each with one request in flight. Blocks
whose buffers go to the kernel as they are (page-aligned, or any contiguous buffer
without O_DIRECT) take the native loop (``_native_io``: one ``ctypes`` call per batch,
the threads started in C, the GIL released throughout); the others (bounce buffers),
and every block where no C compiler is found, take the Python loop on the worker pool
(``os.preadv``/``os.pwritev`` and the checksum release the GIL between its steps).
Both keep the same write order and the same misses.

The tier keeps an in-memory index (key and data checksum per slot), built from the
slot headers at start (``recover``) and from its own writes after. A read returns
data only when the slot holds the requested key and the bytes match the checksum
recorded when they were written; anything else is a miss, counted and logged.

Write order per block (see ``format.py``): invalidate the slot's old header if it
may be valid, write the data, write the new header. ``durable: true`` adds an
``fdatasync`` between a batch's data and its headers for power-loss safety.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kvbm.blockfile import HEADER_BYTES, HEADER_USED, PAGE, BlockHeader, pack_header, unpack_header
from kvbm.config import TierConfig
from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.layout import aligned_empty
from kvbm.tier import Tier, TierContext

from . import _native_io
from ._xxh import xxh3_64
from .config import DiskTierConfig
from .files import (
    O_DIRECT,
    FileOptions,
    StripeFile,
    _fallocate,
    check_free_space,
    lock_directory,
    open_stripe,
    plan_file,
    prepare_directory,
)
from .format import Geometry, Superblock

log = logging.getLogger("kvbm.disk")

_COUNTERS = (
    "blocks_written", "blocks_read", "bytes_written", "bytes_read",
    "write_errors", "read_errors", "enospc", "eio",
    "checksum_failures", "key_mismatches", "short_reads",
    "files_recreated", "files_truncated",
)
_ZERO_PAGE = aligned_empty(HEADER_BYTES)
#: Whether tiers use the native per-block loop (``_native_io``) where it builds. Tests
#: that inject faults through ``os.pwritev``/``os.preadv`` turn it off to reach the
#: Python loop, which every block the native loop cannot take still goes through.
NATIVE_IO = True


class _ThreadBuffers(threading.local):
    """Per-thread aligned buffers: a header page and a bounce buffer for odd callers."""

    header: np.ndarray | None = None
    bounce: np.ndarray | None = None
    headers: np.ndarray | None = None


class DiskTier(Tier):
    """Blocks in O_DIRECT slot files that a restarted manager finds again."""

    kind: ClassVar[str] = "disk"
    medium: ClassVar[str] = "DISK"
    #: Dynamo's frequency filter: only blocks offered at least twice reach the disk.
    default_admission: ClassVar[str] = "frequency"

    @classmethod
    def config_for_rank(cls, config: TierConfig, rank: int, tp_size: int) -> TierConfig:
        """Rank ``rank`` stores its shard under ``<path>/rank<rank>`` of every directory:
        one path shared by all ranks would put two shards in the same slots."""
        paths: list[str] = config.path  # type: ignore[attr-defined]
        return config.model_copy(update={"path": [f"{p}/rank{rank}" for p in paths]})

    def __init__(self, config: DiskTierConfig, ctx: TierContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        self.geom = Geometry(self.block_bytes)
        self.o_direct = not config.disable_o_direct
        if self.o_direct and not O_DIRECT:
            raise ConfigError(
                f"disk tier {self.name!r}: O_DIRECT is not available on this platform; "
                "set disable_o_direct: true (DYN_KVBM_DISK_DISABLE_O_DIRECT=true)"
            )
        self._ns = ctx.namespace.digest
        self._layout = bytes.fromhex(ctx.layout.digest)
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._last_log: dict[str, float] = {}
        self._tls = _ThreadBuffers()
        self._lock_fds: list[int] = []
        self.stripes: list[StripeFile] = []
        self.directories: list[Path] = []
        self.reserved_by = ""
        self._seq = time.time_ns()
        self._recovered: list[tuple[int, SequenceHash]] | None = None
        self.recover_stats: dict[str, float] = {}
        self._last_check = 0.0
        self._engine: Any = None
        self._nio = _native_io.load() if NATIVE_IO else None
        # Threads the native loop may start beyond each caller's own, shared by every
        # batch in flight (as the Python loop's pool of io_threads is): two batches at
        # once must not run 2 x io_threads requests and checksums on the same CPUs.
        self._spare_threads = config.io_threads - 1
        self._spare_lock = threading.Lock()
        try:
            self._open_files()
            # In-memory index: what each slot holds (None: nothing servable) and its
            # data checksum. ``_hdr_live[s]`` is 1 where the on-disk header may still be
            # valid, so the next write to ``s`` must invalidate it before the data.
            self._keys: list[bytes | None] = [None] * self.num_slots
            self._sums: list[int] = [0] * self.num_slots
            self._hdr_live = bytearray(b"\x01") * self.num_slots
            self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix=f"kvbm-{self.name}")
            if config.io_engine == "nixl":
                from .nixl_engine import NixlEngine

                self._engine = NixlEngine(self.name, self.stripes)
        except BaseException:
            self._close_files()
            raise

    # -- start-up ------------------------------------------------------------
    def _open_files(self) -> None:
        cfg = self.cfg
        nstripes = len(cfg.path)
        self.directories = [prepare_directory(self.name, p, self.ctx.namespace.hex) for p in cfg.path]
        for d in self.directories:
            self._lock_fds.append(lock_directory(self.name, d))
        counts = [len(range(i, self.num_slots, nstripes)) for i in range(nstripes)]
        paths = [d / f"blocks-{i}.kvc" for i, d in enumerate(self.directories)]
        check_free_space(
            self.name,
            [(d, self.geom.file_size(n), plan_file(p)) for d, n, p in zip(self.directories, counts, paths, strict=True)],
            self.num_slots,
            self.block_bytes,
        )
        opts = FileOptions(self.o_direct, cfg.allocator_type, cfg.zerofill_fallback)
        hows = set()
        for i, (p, n) in enumerate(zip(paths, counts, strict=True)):
            sb = Superblock(self._ns, self._layout, self.block_bytes, self.geom.stride, i, nstripes)
            stripe, how = open_stripe(self.name, p, sb, self.geom, n, opts)
            self.stripes.append(stripe)
            hows.add(how)
        self.reserved_by = ",".join(sorted(hows))

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

    # -- buffers and counters ------------------------------------------------
    def _header_buf(self) -> np.ndarray:
        b = self._tls.header
        if b is None:
            b = self._tls.header = aligned_empty(HEADER_BYTES)
        return b

    def _bounce(self) -> np.ndarray:
        b = self._tls.bounce
        if b is None:
            # Zeroed once: the padding past block_bytes stays zero for every write.
            b = self._tls.bounce = aligned_empty(self.geom.stride)
        return b

    def _direct_ok(self, a: np.ndarray) -> bool:
        """Whether ``a`` can be handed to the kernel as is (O_DIRECT wants alignment)."""
        if not a.flags.c_contiguous:
            return False
        if not self.o_direct:
            return True
        return a.ctypes.data % PAGE == 0 and a.nbytes % PAGE == 0

    def _add(self, **kv: int) -> None:
        with self._lock:
            for k, v in kv.items():
                self._counts[k] += v

    def _fault(self, counter: str, err: BaseException | None, msg: str, *args: Any) -> None:
        extra: dict[str, int] = {counter: 1}
        if isinstance(err, OSError):
            if err.errno == errno.ENOSPC:
                extra["enospc"] = 1
            elif err.errno == errno.EIO:
                extra["eio"] = 1
        self._add(**extra)
        now = time.monotonic()
        if now - self._last_log.get(counter, 0.0) >= 1.0:
            self._last_log[counter] = now
            why = f" ({err})" if err is not None else ""
            log.warning("kvbm disk tier %r: " + msg + why + "; counted as %s",
                        self.name, *args, counter)

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

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

    # -- data path -------------------------------------------------------------
    def _locate(self, slot: int) -> tuple[StripeFile, int]:
        n = len(self.stripes)
        return self.stripes[slot % n], slot // n

    def _run(self, fn: Callable[[int], bool], count: int) -> list[bool]:
        """``fn(i)`` for every block ``i`` of a batch, spread over the worker pool."""
        if count == 1 or self.cfg.io_threads == 1:
            return [fn(i) for i in range(count)]
        k = min(self.cfg.io_threads, count)
        out = [False] * count
        # Each thread takes the next block when its last one is done (not every k-th
        # block): a slow request then delays only its own thread's share.
        todo = iter(range(count))
        take = threading.Lock()

        def work(_: int) -> None:
            while True:
                with take:
                    i = next(todo, -1)
                if i < 0:
                    return
                out[i] = fn(i)

        list(self._pool.map(work, range(k)))
        return out

    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        """Store each block (invalidate old header, data, new header); False where it failed."""
        self._check_files()
        if self._engine is not None:
            return self._engine_write(slots, keys, src)
        durable = self.cfg.durable
        n = len(slots)
        sums: list[int | None] = [None] * n
        ok = [False] * n
        fast, rest = self._split(src)
        if fast:
            self._native_write(fast, slots, keys, src, sums, ok, headers=not durable)

        def data(j: int) -> bool:
            i = rest[j]
            s = sums[i] = self._write_data(slots[i], keys[i], src[i])
            if s is None:
                return False
            return True if durable else self._write_header(slots[i], keys[i], s)

        if rest:
            for i, g in zip(rest, self._run(data, len(rest)), strict=True):
                ok[i] = g
        if durable and any(ok):
            ok = self._sync_then_headers(slots, keys, sums, ok)
        good = sum(ok)
        self._add(blocks_written=good, bytes_written=good * self.block_bytes)
        return ok

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
        on its caller's thread alone). Returns the threads used."""
        with self._spare_lock:
            extra = min(min(self.cfg.io_threads, n) - 1, self._spare_threads)
            self._spare_threads -= extra
        try:
            counter = np.zeros(1, np.int64)
            fn(extra + 1, counter.ctypes.data)
        finally:
            with self._spare_lock:
                self._spare_threads += extra
        return extra + 1

    def _native_write(
        self, idx: list[int], slots: Sequence[int], keys: Sequence[SequenceHash],
        src: Sequence[np.ndarray], sums: list[int | None], ok: list[bool], headers: bool,
    ) -> None:
        """Blocks ``idx`` of a batch through the native loop: invalidate, data, checksum,
        header (``headers``; else the caller syncs and writes them); results into
        ``sums`` and ``ok``, the index and the counters as the Python loop keeps them."""
        nio = self._nio
        assert nio is not None
        m = len(idx)
        geom = self.geom
        fd, buf, ln, doff, hoff, inval = (np.empty(m, np.int64) for _ in range(6))
        flat = [src[i].reshape(-1) for i in idx]  # alive until the call returns
        where = [self._locate(slots[i]) for i in idx]
        for j, i in enumerate(idx):
            st, local = where[j]
            self._keys[slots[i]] = None
            fd[j], buf[j], ln[j] = st.fd, flat[j].ctypes.data, flat[j].nbytes
            doff[j], hoff[j] = geom.data_offset(local), geom.header_offset(local)
            inval[j] = self._hdr_live[slots[i]]
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
                out.ctypes.data, status.ctypes.data)
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

    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray] | None
    ) -> list[bool]:
        """Fill each buffer from its slot; False where the slot lacks the key or fails its checksum."""
        self._check_files()
        if self._engine is not None and dst is not None:
            return self._engine_read(slots, keys, dst)
        if dst is None:
            ok = self._run(lambda i: self._read_one(slots[i], keys[i], None), len(slots))
        else:
            ok = [False] * len(slots)
            fast, rest = self._split(dst)
            if fast:
                self._native_read(fast, slots, keys, dst, ok)
            if rest:
                got = self._run(lambda j: self._read_one(slots[rest[j]], keys[rest[j]], dst[rest[j]]),
                                len(rest))
                for i, g in zip(rest, got, strict=True):
                    ok[i] = g
        good = sum(ok)
        self._add(blocks_read=good, bytes_read=good * self.block_bytes)
        if good < len(ok):
            self._check_files(force=True)
        return ok

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
                self.block_bytes, nio.hash_ptr, out.ctypes.data, status.ctypes.data)
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

    # -- optional NIXL engine ----------------------------------------------------
    def _engine_write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        # Headers stay on the posix path (4 KiB each); NIXL moves the data in one transfer.
        def invalidate(i: int) -> bool:
            st, local = self._locate(slots[i])
            self._keys[slots[i]] = None
            if not self._hdr_live[slots[i]]:
                return True
            try:
                os.pwritev(st.fd, [_ZERO_PAGE], self.geom.header_offset(local))
            except OSError as e:
                self._fault("write_errors", e, "header invalidation of slot %d failed", slots[i])
                return False
            self._hdr_live[slots[i]] = 0
            return True

        ok = self._run(invalidate, len(slots))
        flat = [s.reshape(-1) for s in src]
        moved = self._engine.transfer("WRITE", [self._locate(s) for s in slots], flat, self.geom, ok)
        ok = [a and b for a, b in zip(ok, moved, strict=True)]
        if not all(moved):
            self._fault("write_errors", None, "NIXL write failed for %d blocks", moved.count(False))
        sums = [xxh3_64(f) if g else None for f, g in zip(flat, ok, strict=True)]
        if self.cfg.durable and any(ok):
            return self._sync_then_headers(slots, keys, sums, ok)
        res = self._run(
            lambda i: ok[i] and self._write_header(slots[i], keys[i], sums[i] or 0), len(slots)
        )
        good = sum(res)
        self._add(blocks_written=good, bytes_written=good * self.block_bytes)
        return res

    def _engine_read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        ok = [self._keys[s] == k for s, k in zip(slots, keys, strict=True)]
        for g, s in zip(ok, slots, strict=True):
            if not g:
                self._fault("key_mismatches", None, "slot %d does not hold the requested block", s)
        flat = [d.reshape(-1) for d in dst]
        moved = self._engine.transfer("READ", [self._locate(s) for s in slots], flat, self.geom, ok)
        out = []
        for s, f, g, m in zip(slots, flat, ok, moved, strict=True):
            if g and not m:
                self._fault("read_errors", None, "NIXL read of slot %d failed", s)
            good = g and m and xxh3_64(f) == self._sums[s]
            if g and m and not good:
                self._fault("checksum_failures", None, "slot %d failed its checksum", s)
            out.append(good)
        n = sum(out)
        self._add(blocks_read=n, bytes_read=n * self.block_bytes)
        return out

    # -- the rest of the contract ----------------------------------------------
    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        """Forget evicted blocks in the index.

        The on-disk header is left alone (no I/O on the eviction path): the next write
        to the slot invalidates it first, and until then the block is still intact.
        """
        for s, k in zip(slots, keys, strict=True):
            if 0 <= s < self.num_slots and self._keys[s] == k:
                self._keys[s] = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
        out.update(self.recover_stats)
        out.update(
            paths=[str(st.path) for st in self.stripes],
            o_direct=self.o_direct,
            allocator_type=self.cfg.allocator_type,
            reserved_by=self.reserved_by,
            io_engine=self.cfg.io_engine,
            io_threads=self.cfg.io_threads,
        )
        return out

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)  # idempotent; a later write or read raises, and the manager counts it
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._close_files()

    def _close_files(self) -> None:
        for st in self.stripes:
            for fd in [st.fd, *st.retired]:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.stripes = []
        for fd in self._lock_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lock_fds = []

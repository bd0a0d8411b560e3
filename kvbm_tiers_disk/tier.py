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
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kvbm.config import TierConfig
from kvbm.errors import ConfigError
from kvbm.hashing import SequenceHash
from kvbm.tier import TierContext

from . import _native_io
from .base import _COUNTERS, _ThreadBuffers
from .config import DiskTierConfig
from .files import (
    O_DIRECT,
    FileOptions,
    StripeFile,
    check_free_space,
    lock_directory,
    open_stripe,
    plan_file,
    prepare_directory,
)
from .format import Geometry, Superblock
from .native_loop import NativeLoop
from .nixl_engine import NixlPath
from .recovery import Recovery

#: Whether tiers use the native per-block loop (``_native_io``) where it builds. Tests
#: that inject faults through ``os.pwritev``/``os.preadv`` turn it off to reach the
#: Python loop, which every block the native loop cannot take still goes through.
NATIVE_IO = True

class DiskTier(Recovery, NativeLoop, NixlPath):
    """Blocks in O_DIRECT slot files that a restarted manager finds again."""

    kind: ClassVar[str] = "disk"
    medium: ClassVar[str] = "DISK"
    #: Dynamo's frequency filter: only blocks offered at least twice reach the disk.
    default_admission: ClassVar[str] = "frequency"
    #: An onboard read into promotion slots (``kvbm.staging.read_into_promotion``) is
    #: split into parts of at least this many blocks: the copy of one part into the
    #: engine overlaps the read of the next (8 threads keep a part's requests in flight).
    onboard_part_blocks: ClassVar[int] = 32

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
        # The native loop's requests through the kernel's AIO (each block's checksum
        # while its own transfer is in flight); False: pread/pwrite, then the checksum.
        self._aio = _native_io.AIO
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
            # 1 where the slot's space was never written: the file was empty when this
            # tier opened it (ext4 and XFS convert such preallocated extents on a slot's
            # first write, which costs more than an overwrite; ``fresh_writes`` counts
            # those, so a benchmark can weigh its limit by them).
            self._fresh = bytearray(self.num_slots)
            n = len(self.stripes)
            for st in self.stripes:
                if st.index in self._empty_stripes:
                    self._fresh[st.index :: n] = b"\x01" * len(range(st.index, self.num_slots, n))
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
        self._empty_stripes = {i for i, p in enumerate(paths) if plan_file(p) == 0}
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
        fresh = self._fresh
        first = sum(1 for s, g in zip(slots, ok, strict=True) if g and 0 <= s < len(fresh) and fresh[s])
        for s in slots:
            if 0 <= s < len(fresh):
                fresh[s] = 0
        self._add(blocks_written=good, bytes_written=good * self.block_bytes, fresh_writes=first)
        return ok

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

"""What every part of the disk tier shares: its state, per-thread buffers, counters
and fault logging, where a slot lives, and the worker pool's per-block loop.

``DiskTier`` (``tier.py``) is assembled from this base and the parts built on it:
``recovery.py`` (the start-up scan and files changed underneath), ``pyloop.py`` (the
Python I/O loop), ``native_loop.py`` (the glue to the C loop in ``_native_io``) and
``nixl_engine.py`` (the optional NIXL data path).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kvbm.blockfile import HEADER_BYTES, PAGE
from kvbm.layout import aligned_empty
from kvbm.tier import Tier

from . import _native_io
from .config import DiskTierConfig
from .files import StripeFile
from .format import Geometry

log = logging.getLogger("kvbm.disk")

_COUNTERS = (
    "blocks_written", "blocks_read", "bytes_written", "bytes_read",
    "write_errors", "read_errors", "enospc", "eio",
    "checksum_failures", "key_mismatches", "short_reads",
    "files_recreated", "files_truncated", "async_requests", "fresh_writes",
)
_ZERO_PAGE = aligned_empty(HEADER_BYTES)
#: Whether tiers use the native per-block loop (``_native_io``) where it builds. Tests

class _ThreadBuffers(threading.local):
    """Per-thread aligned buffers: a header page and a bounce buffer for odd callers."""

    header: np.ndarray | None = None
    bounce: np.ndarray | None = None
    headers: np.ndarray | None = None


class TierBase(Tier):
    """The disk tier's state (set by ``DiskTier.__init__``) and the helpers every
    part uses."""

    cfg: DiskTierConfig
    geom: Geometry
    o_direct: bool
    _ns: bytes
    _layout: bytes
    _lock: threading.Lock
    _check_lock: threading.Lock
    _counts: dict[str, int]
    _last_log: dict[str, float]
    _tls: _ThreadBuffers
    _lock_fds: list[int]
    stripes: list[StripeFile]
    directories: list[Path]
    reserved_by: str
    _seq: int
    _recovered: list[tuple[int, Any]] | None
    recover_stats: dict[str, float]
    _last_check: float
    _engine: Any
    _nio: _native_io.NativeIO | None
    _aio: bool
    _spare_threads: int
    _spare_lock: threading.Lock
    _keys: list[bytes | None]
    _sums: list[int]
    _hdr_live: bytearray
    _fresh: bytearray
    _pool: ThreadPoolExecutor

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

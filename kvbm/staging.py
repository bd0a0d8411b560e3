"""Reusable page-aligned block buffers for copies between tiers.

Lower tiers (disk with O_DIRECT, S3) read and write through staging buffers. Carving
them from a few large anonymous mappings keeps them 4096-aligned and spares a page
fault per block per transfer; buffers return to a free list after each transfer.

The mappings are private, 2 MiB-aligned and advised for transparent huge pages (as
the host tier's arena): an O_DIRECT request pins its buffer's pages one by one, and
the copy into a buffer and the disk tier's checksum of it walk its pages, so 2 MiB
pages take 512 times fewer pins and TLB entries. On this 2-vCPU VM, the disk tier read
into 2 MiB pages at 0.96 of fio and into 4 KiB pages at 0.54 (median of 3 rounds,
load 8.7). Where private mappings or ``madvise`` are missing, ``aligned_empty``.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ._copy_fns import _Direct, _rows_fn
from .hashing import SequenceHash
from .layout import aligned_empty

if TYPE_CHECKING:
    from .executor import Executor
    from .plan import LoadOp

#: Huge-page size the arenas are aligned to (x86-64 and arm64's 4K-granule THP).
HUGE_PAGE = 2 * 2**20


def huge_page_arena(nbytes: int) -> np.ndarray:
    """``nbytes`` of zeroed private anonymous memory, 2 MiB-aligned, advised
    ``MADV_HUGEPAGE`` (a shared mapping, as ``aligned_empty``'s, lives in shmem, which
    takes huge pages only where ``shmem_enabled`` allows, ``never`` by default).
    Without ``MAP_PRIVATE`` or ``madvise`` (or THP off): 4 KiB pages, same bytes."""
    private, anon = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if private is None or anon is None:
        return aligned_empty(nbytes)
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private | anon)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            mm.madvise(advice)
    whole = np.frombuffer(mm, dtype=np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE
    return whole[skip : skip + nbytes]


class StagingPool:
    """A thread-safe free list of ``block_bytes`` aligned buffers that grows on demand."""

    def __init__(self, block_bytes: int, chunk_blocks: int = 32) -> None:
        self.block_bytes = block_bytes
        # Each buffer starts on a 4096 boundary so that O_DIRECT accepts it.
        self._stride = -(-block_bytes // 4096) * 4096
        self._chunk_blocks = chunk_blocks
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.allocated = 0

    def acquire(self, n: int) -> list[np.ndarray]:
        """``n`` buffers of ``block_bytes`` each; give them back with ``release``."""
        with self._lock:
            if len(self._free) < n:
                self._grow(max(n - len(self._free), self._chunk_blocks))
            out = self._free[-n:] if n else []
            del self._free[len(self._free) - n :]
            return out

    def release(self, bufs: list[np.ndarray]) -> None:
        with self._lock:
            self._free.extend(bufs)

    def _grow(self, n: int) -> None:
        arena = huge_page_arena(n * self._stride)
        arena[::4096] = 0  # fault the pages in here, not inside the first copy into them
        for i in range(n):
            self._free.append(arena[i * self._stride : i * self._stride + self.block_bytes])
        self.allocated += n


# -- reads of a lower tier straight into their promotion slots ----------------------------
class InSlot(_Direct):
    """A block read straight into its promotion slot of the upper tier's memory: the
    promotion has nothing left to copy (``Executor._promote`` commits it in place)."""

    __slots__ = ()


def _parts(n: int, min_blocks: int, most: int = 4) -> list[tuple[int, int]]:
    """``[a, b)`` bounds of up to ``most`` parts of ``n`` blocks, each of at least
    ``min_blocks`` (one part where ``min_blocks`` is 0 or ``n`` is small)."""
    k = max(1, min(most, n // min_blocks)) if min_blocks > 0 else 1
    return [(j * n // k, (j + 1) * n // k) for j in range(k)]  # sizes n // k or one more


def read_into_promotion(ex: Executor, op: LoadOp, t: int, members: list[int], dest: Any,
                        out: list[Any], copy_now: bool = True) -> list[int]:
    """Read tier ``t``'s blocks of ``op`` that are promoted into a memory tier straight
    into their promotion slots (the upper tier's rows), then (``copy_now``) copy them
    from there into ``dest``; returns the positions of ``members`` left to the caller's
    path. Without ``copy_now`` (a layer-wise load) the caller copies each layer from
    the slots, and counts the path's time.

    This spares a staging buffer per block and the promotion's own copy (the bytes are
    already in the slot: ``InSlot``). Where tier ``t`` sets ``Tier.onboard_part_blocks`` (the
    disk tier), the read is split into parts read one after the other on a thread of
    its own while this thread copies the previous part into ``dest``. A block whose read
    fails stays None in ``out`` (a miss; its slot's bytes are never served: the
    promotion reports it failed and the planner frees the slot). Every part's read has
    finished before this returns or raises, so nothing writes into a slot after the
    planner has settled it.
    """
    p = op.promote_tier
    rows = ex._rows(p) if p != t else None
    if rows is None or ex._rows(t) is not None:
        return members
    mine = [i for i in members if op.promote_slots[i] >= 0]
    refused = ex._claim(p, [op.promote_slots[i] for i in mine]) if mine else set()
    mine = [i for k, i in enumerate(mine) if k not in refused]
    if not mine:
        return members
    t0 = time.perf_counter()
    taken = set(mine)
    tier = ex.tiers[t]
    least = tier.onboard_part_blocks if copy_now else 0
    parts = [mine[a:b] for a, b in _parts(len(mine), least)]
    done: list[list[bool] | BaseException | None] = [None] * len(parts)
    ready = [threading.Event() for _ in parts]

    def read(k: int) -> None:
        part = parts[k]
        try:
            done[k] = ex._read(t, [op.slots[i] for i in part], [SequenceHash(op.keys[i]) for i in part],
                               [rows[op.promote_slots[i]] for i in part])
        except BaseException as e:  # _read turns a tier's errors into False; anything else
            done[k] = e
        finally:
            ready[k].set()

    def read_all() -> None:
        for k in range(len(parts)):
            read(k)

    reader = None
    if len(parts) > 1:
        reader = threading.Thread(target=read_all, name="kvbm-promote-read", daemon=True)
        reader.start()
    else:
        read(0)
    fast = _rows_fn(dest, out=False)
    good_n = failed_n = 0
    try:
        for k, part in enumerate(parts):
            ready[k].wait()
            ok = done[k]
            if isinstance(ok, BaseException):
                raise ok
            assert ok is not None
            good = [i for i, g in zip(part, ok, strict=True) if g]
            failed_n += len(part) - len(good)
            good_n += len(good)
            at = [op.promote_slots[i] for i in good]
            for i, s in zip(good, at, strict=True):
                out[i] = InSlot(rows[s])
            if not good or not copy_now:
                continue
            idx = [op.dst[i] for i in good]
            if fast is not None:
                ex._copy_rows(fast, idx, rows, at)
            else:
                ex.split_copy(dest.copy_in, idx, [rows[s] for s in at])
    finally:
        if reader is not None:
            reader.join()
    if copy_now:
        ex.count(f"onboard:{tier.name}", good_n, time.perf_counter() - t0, failed_n)
    return [i for i in members if i not in taken]


class _Queued:
    """One cascade copy's blocks waiting in a ``CascadeBatch``."""

    __slots__ = ("slots", "keys", "bufs", "since", "taken", "result", "idle")

    def __init__(self, slots: list[int], keys: list[SequenceHash], bufs: list[np.ndarray]) -> None:
        self.slots, self.keys, self.bufs = slots, keys, bufs
        self.since = time.perf_counter()
        self.taken = False
        self.result: list[bool] | None = None
        self.idle = 0.0


class CascadeBatch:
    """Small cascade writes into a lower tier gathered into one ``write`` call.

    Demotions (host -> disk) arrive one offload's blocks at a time (18-63 blocks in
    ``kvbm bench``); each ``write`` call pays a ramp-up and a tail where fewer than
    ``io_threads`` requests are in flight. A copy of fewer than ``min_blocks`` waits
    here (on its own I/O thread; its source slots stay pinned in the upper tier,
    which keeps serving them) until the queued copies reach ``min_blocks``, or
    ``max_waiters`` copies wait (the I/O threads must not all block), or the oldest
    waited ``max_wait_s``, or a flush is under way: then the thread that sees it
    writes them all in one call and hands each copy its flags. A failed write (the
    executor's ``_write``: all False on a raise) fails each copy's blocks: skipped.

    ``idle`` per copy is its time in the queue less its share (by blocks) of the
    write: the executor counts the path's seconds without it, so a batch's write
    time is counted once, as when the copies wrote one after the other.
    """

    def __init__(self, min_blocks: int = 64, max_wait_s: float = 1.0, max_waiters: int = 3) -> None:
        self.min_blocks = min_blocks
        self.max_wait_s = max_wait_s
        self.max_waiters = max(1, max_waiters)
        self._cond = threading.Condition()
        self._queues: dict[int, list[_Queued]] = {}
        self._flushing = 0
        #: Coalesced ``write`` calls and the copies they carried (for accounting).
        self.batches = 0
        self.copies = 0

    @contextlib.contextmanager
    def flushing(self) -> Any:
        """While inside, every queued copy is written at once (``Executor.flush``)."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._flushing -= 1

    def queued(self) -> int:
        """Blocks waiting for a gathered write now."""
        with self._cond:
            return sum(len(e.slots) for q in self._queues.values() for e in q)

    def _ready(self, q: list[_Queued]) -> bool:
        return bool(q) and (self._flushing > 0 or len(q) >= self.max_waiters
                            or sum(len(e.slots) for e in q) >= self.min_blocks
                            or time.perf_counter() - q[0].since >= self.max_wait_s)

    def write(self, ex: Executor, t: int, slots: list[int], keys: list[SequenceHash],
              bufs: list[np.ndarray]) -> tuple[list[bool], float]:
        """``ex._write(t, ...)``, gathered with other small copies into tier ``t``;
        returns the flags and the seconds this copy only waited (see the class)."""
        if len(slots) >= self.min_blocks or self.max_wait_s <= 0 or not slots:
            return ex._write(t, slots, keys, bufs), 0.0
        me = _Queued(slots, keys, bufs)
        with self._cond:
            q = self._queues.setdefault(t, [])
            q.append(me)
            while not me.taken and not self._ready(q):
                self._cond.wait(max(1e-3, self.max_wait_s - (time.perf_counter() - q[0].since)))
            if me.taken:  # another thread writes the batch this copy is in
                while me.result is None:
                    self._cond.wait()
                return me.result, me.idle
            batch = q[:]
            q.clear()
            for e in batch:
                e.taken = True
        t0 = time.perf_counter()
        ok: list[bool] = []
        try:
            ok = ex._write(t, [s for e in batch for s in e.slots], [k for e in batch for k in e.keys],
                           [b for e in batch for b in e.bufs])
        except Exception:  # _write answers failures as flags; anything else fails them too
            ok = []
        finally:  # the copies waiting on this batch get their flags whatever happened
            self._settle(batch, ok, t0)
        assert me.result is not None
        return me.result, me.idle

    def _settle(self, batch: list[_Queued], ok: list[bool], t0: float) -> None:
        t1 = time.perf_counter()
        total = sum(len(e.slots) for e in batch)
        if len(ok) != total:
            ok = [False] * total
        with self._cond:
            a = 0
            for e in batch:
                n = len(e.slots)
                e.result = ok[a:a + n]
                e.idle = max(0.0, (t1 - e.since) - (t1 - t0) * n / total)
                a += n
            self.batches += 1
            self.copies += len(batch)
            self._cond.notify_all()

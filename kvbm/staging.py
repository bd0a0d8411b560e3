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
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ._copy_fns import _COPIED, _Direct, _rows_fn
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
    """A thread-safe free list of ``block_bytes`` aligned buffers that grows on demand,
    a chunk ahead of its use.

    Growing means mapping and touching fresh pages (about 1 ms a MiB here: the kernel
    zeroes them), which a transfer should not wait for. So after an ``acquire`` leaves
    fewer than ``chunk_blocks`` buffers spare, a short-lived background thread maps and
    touches enough to bring the spare back to one chunk, while the caller goes on.
    An ``acquire`` that finds too few free waits for a grow in flight, then grows on its
    own path what is still missing. ``prime`` grows the first chunk so (the executor
    calls it where a tier has no views); a pool neither primed nor used stays empty.

    Memory is bounded: ``allocated`` never exceeds the most buffers ever in use at once
    (``peak_in_use``) plus ``chunk_blocks`` (one chunk, 64 MiB of 2 MiB blocks). Buffers are never given
    back to the system before the pool goes (as before): a transfer's peak stays mapped.
    A background grow that fails (no memory, no thread) turns ``ahead`` off: the pool
    then grows on the caller's path only, as it did before it grew ahead.
    """

    def __init__(self, block_bytes: int, chunk_blocks: int = 32, ahead: bool = True) -> None:
        self.block_bytes = block_bytes
        # Each buffer starts on a 4096 boundary so that O_DIRECT accepts it.
        self._stride = -(-block_bytes // 4096) * 4096
        self._chunk_blocks = max(1, chunk_blocks)
        self._free: list[np.ndarray] = []
        self._lock = threading.Condition(threading.Lock())
        self.ahead = ahead
        self._growing = False  # a background grow in flight
        self._grower: threading.Thread | None = None
        self._grower_pid = 0  # the process that claimed the grow in flight
        self.allocated = 0
        self.grown_on_path = 0  # blocks mapped inside ``acquire`` (its caller waited)
        self.grown_ahead = 0  # blocks mapped by the background grower
        self.peak_in_use = 0  # the most buffers out at once

    def acquire(self, n: int) -> list[np.ndarray]:
        """``n`` buffers of ``block_bytes`` each; give them back with ``release``."""
        with self._lock:
            while len(self._free) < n and self._in_flight():
                self._lock.wait(0.1)  # the chunk being touched may cover it
            if len(self._free) < n:  # only the shortfall where a chunk follows behind
                short = n - len(self._free)
                bufs = self._new(short if self.ahead else max(short, self._chunk_blocks))
                self._free.extend(bufs)
                self.allocated += len(bufs)
                self.grown_on_path += len(bufs)
            out = self._free[-n:] if n else []
            del self._free[len(self._free) - n :]
            self.peak_in_use = max(self.peak_in_use, self.allocated - len(self._free))
            want = self._chunk_blocks - len(self._free)
            start = n > 0 and self.ahead and not self._growing and want > 0
            if start:
                self._claim_grower(want)
        if start:
            self._start_ahead()
        return out

    def release(self, bufs: list[np.ndarray]) -> None:
        with self._lock:
            self._free.extend(bufs)

    def prime(self) -> None:
        """Start growing the first chunk now, in the background (the executor does where
        a tier moves its blocks through staging), so the first transfer finds it."""
        with self._lock:
            want = self._chunk_blocks - len(self._free)
            start = self.ahead and not self._growing and want > 0
            if start:
                self._claim_grower(want)
        if start:
            self._start_ahead()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait for a background grow in flight; False if one is still running."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._in_flight(), timeout)

    def _in_flight(self) -> bool:
        """A background grow is running (under the lock). One claimed by another process
        (this one was forked while it ran, and its thread did not come along) is given
        up on. Not judged by the thread: between getting its ident and being marked
        started, a grower just starting says it is not alive."""
        if self._growing and self._grower_pid != os.getpid():
            self._growing = False
        return self._growing

    def _claim_grower(self, want: int) -> None:
        """Mark a grow in flight, by this process, and name its thread in one step
        (under the lock): an acquire never sees one without the other."""
        self._growing = True
        self._grower_pid = os.getpid()
        self._grower = threading.Thread(target=self._grow_ahead, args=(want,),
                                        name="kvbm-staging-grow", daemon=True)

    def _start_ahead(self) -> None:
        g = self._grower
        try:
            assert g is not None
            g.start()
        except RuntimeError:  # no thread to be had: grow on the path from now on
            self._ahead_done(None)

    def _grow_ahead(self, want: int) -> None:
        bufs: list[np.ndarray] | None = None
        try:
            bufs = self._new(want)  # outside the lock: acquires and releases go on
        except Exception:  # MemoryError, OSError from mmap: the path grows, as before
            bufs = None
        finally:
            self._ahead_done(bufs)

    def _ahead_done(self, bufs: list[np.ndarray] | None) -> None:
        with self._lock:
            if bufs is None:
                self.ahead = False
            else:
                self._free.extend(bufs)
                self.allocated += len(bufs)
                self.grown_ahead += len(bufs)
            self._growing = False
            self._lock.notify_all()

    def _new(self, n: int) -> list[np.ndarray]:
        """``n`` fresh buffers, their pages faulted in here, not inside the first copy."""
        arena = huge_page_arena(n * self._stride)
        arena[::4096] = 0
        return [arena[i * self._stride : i * self._stride + self.block_bytes] for i in range(n)]


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


# -- staged reads in parts, overlapped with the copy into the engine -----------------------
def read_staged_parts(ex: Executor, op: LoadOp, t: int, members: list[int], dest: Any,
                      out: list[Any], t0: float) -> bool:
    """Read tier ``t``'s blocks ``members`` of ``op`` (none of them promoted) through
    staging buffers in parts, part ``k+1`` read on a thread of its own while this thread
    copies part ``k`` into ``dest``; False (nothing done) where the tier sets no
    ``Tier.onboard_part_blocks``, the batch makes one part, or a block is promoted (its
    buffer must outlive the copy). Each part's buffers go back to the pool once copied,
    so the pool holds the parts in flight, not the whole batch.

    A block whose read fails (or whose part's read raised ``Exception``, which ``_read``
    turns into failures) stays None in ``out``: a miss. Copied blocks are ``_COPIED``.
    Every part's read has finished before this returns or raises, and every buffer is
    released once, so nothing writes into a buffer after it is back in the pool.
    """
    spans = _parts(len(members), ex.tiers[t].onboard_part_blocks)
    if len(spans) < 2 or (op.promote_op and any(op.promote_slots[i] >= 0 for i in members)):
        return False
    parts = [members[a:b] for a, b in spans]
    bufs: list[list[np.ndarray] | None] = [None] * len(parts)
    done: list[list[bool] | BaseException | None] = [None] * len(parts)
    ready = [threading.Event() for _ in parts]

    def read_all() -> None:
        for k, part in enumerate(parts):
            try:
                b = bufs[k] = ex.staging.acquire(len(part))
                done[k] = ex._read(t, [op.slots[i] for i in part],
                                   [SequenceHash(op.keys[i]) for i in part], b)
            except BaseException as e:  # _read turns a tier's errors into False
                done[k] = e
            finally:
                ready[k].set()

    reader = threading.Thread(target=read_all, name="kvbm-staged-read", daemon=True)
    reader.start()
    good_n = failed_n = 0
    try:
        for k, part in enumerate(parts):
            ready[k].wait()
            ok, b = done[k], bufs[k]
            if isinstance(ok, BaseException):
                raise ok
            assert ok is not None and b is not None
            good = [j for j, g in enumerate(ok) if g]
            failed_n += len(part) - len(good)
            good_n += len(good)
            if good:
                ex.split_copy(dest.copy_in, [op.dst[part[j]] for j in good], [b[j] for j in good])
            for j in good:
                out[part[j]] = _COPIED
            bufs[k] = None
            ex.staging.release(b)
    finally:
        reader.join()
        for left in bufs:
            if left is not None:
                ex.staging.release(left)
    ex.count(f"onboard:{ex.tiers[t].name}", good_n, time.perf_counter() - t0, failed_n)
    return True

"""The executor: the data half of the data path, written once for every caller.

It holds this process's storage of every tier of the chain and runs a ``Plan`` on it:
copies between engine blocks and tier slots (straight into a memory tier's views,
or through page-aligned staging buffers), copies between tiers, probes and discards,
batched, split over copy threads, with file and network I/O inside the tiers. It
answers each operation with the positions that failed (``Report``); it never
touches a registry. ``KvBlockManager`` runs one next to its planner; under vLLM each
worker runs one on its own shard of the KV heads.

Failures of a tier are failed positions, never exceptions: a write or read that
raises, returns the wrong number of flags, or whose block fails its check. Errors of
the caller's engine memory (a bad block index, a shape the layout does not fit)
propagate, but only after every part of the copy has finished, so nothing writes
into a slot after the planner has settled it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from ._copy_fns import _COPIED, _copy_from, _Direct, _raw, _rows_fn, _shares, _views_of
from .engine_blocks import _native
from .foreground import Foreground
from .hashing import SequenceHash
from .layout import BlockDestination, BlockLayout, BlockSource
from .pathstats import PathStats
from .plan import CopyOp, DiscardOp, LoadOp, Plan, ProbeOp, Report, SaveOp
from .served import SlotMap
from .staging import InSlot, StagingPool, read_into_promotion, read_staged_parts
from .tier import Tier

log = logging.getLogger("kvbm")

#: A staged save is split into about this many parts (copy of one overlaps the write
#: of the previous), of at least ``_PIPELINE_MIN`` blocks each. Small parts keep the
#: first copy (which nothing overlaps) and the last write (likewise) short.
_PIPELINE_PARTS = 8
_PIPELINE_MIN = 4


class Executor:
    """Runs plans on this process's tiers; reports failed positions per operation."""

    def __init__(self, tiers: Sequence[Tier], layout: BlockLayout, *, copy_threads: int = 2,
                 io_threads: int = 4, probe_timeout_s: float = 0.5, name: str = "kvbm",
                 background_yield_s: float = 0.2) -> None:
        self.tiers = list(tiers)
        self.layout = layout
        self.block_bytes = layout.bytes_per_block
        self.staging = StagingPool(self.block_bytes)
        if any(type(t).views is Tier.views for t in self.tiers):  # moves blocks through staging
            self.staging.prime()
        self.probe_timeout_s = probe_timeout_s
        self.foreground = Foreground(background_yield_s)  # the cascade waits for loads
        self._copy_threads = max(1, copy_threads)
        self._copy_pool = (ThreadPoolExecutor(self._copy_threads - 1,
                                              thread_name_prefix=f"{name}-copy")
                           if self._copy_threads > 1 else None)
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix=f"{name}-io")
        # Writes of a pipelined save: two threads, so the next part's write queues on the
        # tier's I/O threads while the last blocks of the previous one finish.
        self._writer = ThreadPoolExecutor(2, thread_name_prefix=f"{name}-write")
        # Probes of shared tiers: a caller waits at most probe_timeout_s; a hung server
        # fills these threads and later probes count as misses at once, not queued.
        self._probe_threads = 4
        self._probe_pool = ThreadPoolExecutor(self._probe_threads,
                                              thread_name_prefix=f"{name}-probe")
        self._probes_running = 0
        self.probe_timeouts = 0
        self._lock = threading.Lock()
        self._inflight: set[Future[Any]] = set()
        self.paths: dict[str, PathStats] = {}
        self.served: dict[int, SlotMap] = {}
        self._last_warn: dict[str, float] = {}
        self._closed = False

    # -- peers -------------------------------------------------------------------------
    def serve_peers(self) -> None:
        """Hand every ``serves_peers`` tier the slot map of the tier it serves.

        The map is kept here, from the writes and discards this executor runs, in one
        process and in every vLLM worker alike.
        """
        arenas = {t.name: (i, t.peer_arena()) for i, t in enumerate(self.tiers)}
        candidates = [n for n, (_, a) in arenas.items() if a is not None]
        for t in self.tiers:
            if not type(t).serves_peers:
                continue
            name = t.served_tier(candidates)
            if name is None:
                continue
            i, arena = arenas[name]
            assert arena is not None, f"tier {name!r} offers no arena to serve"
            if i not in self.served:
                self.served[i] = SlotMap(arena)
            t.serve(self.served[i])

    def _claim(self, tier: int, slots: Sequence[int]) -> set[int]:
        """Positions of ``slots`` a peer's lease holds: they must not be written now."""
        m = self.served.get(tier)
        if m is None:
            return set()
        return {i for i, ok in enumerate(m.claim(slots)) if not ok}

    def _commit(self, tier: int, slots: Sequence[int], keys: Sequence[bytes],
                failed: set[int]) -> None:
        m = self.served.get(tier)
        if m is not None:
            done = [i for i in range(len(slots)) if i not in failed]
            m.commit([slots[i] for i in done], [keys[i] for i in done])

    # -- bookkeeping -------------------------------------------------------------------
    def warn(self, what: str, msg: str, *args: Any) -> None:
        """Log a warning, at most once a second per ``what``."""
        now = time.monotonic()
        if now - self._last_warn.get(what, 0.0) >= 1.0:
            self._last_warn[what] = now
            log.warning(msg, *args)

    def count(self, path: str, blocks: int, seconds: float, failures: int = 0) -> None:
        """Add one transfer to path ``path``'s counters."""
        with self._lock:
            st = self.paths.get(path)
            if st is None:
                st = self.paths[path] = PathStats()
            st.blocks += blocks
            st.bytes += blocks * self.block_bytes
            end = time.perf_counter()
            st.add(end - seconds, end)
            st.failures += failures

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn`` on an I/O thread; ``flush`` waits for it."""
        fut = self._io.submit(fn, *args)
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[Any]) -> None:
        with self._lock:
            self._inflight.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("kvbm: background transfer failed: %r", fut.exception(),
                      exc_info=fut.exception())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the background work (and what it submits in turn); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = set(self._inflight)
            if not pending:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            wait(pending, timeout=left)

    @property
    def busy(self) -> int:
        """Background jobs not finished."""
        with self._lock:
            return len(self._inflight)

    # -- tier calls that never raise -----------------------------------------------------
    def _write(self, t: int, slots: Sequence[int], keys: Sequence[SequenceHash],
               bufs: Sequence[np.ndarray]) -> list[bool]:
        return self._call(t, "write", "skipped", slots, keys, bufs)

    def _read(self, t: int, slots: Sequence[int], keys: Sequence[SequenceHash],
              bufs: Sequence[np.ndarray]) -> list[bool]:
        return self._call(t, "read", "treated as misses", slots, keys, bufs)

    def _call(self, t: int, what: str, outcome: str, slots: Sequence[int],
              keys: Sequence[SequenceHash], bufs: Sequence[np.ndarray]) -> list[bool]:
        """``tier.write`` or ``tier.read``, with a raise or a wrong answer as all failed."""
        tier = self.tiers[t]
        if not slots:
            return []
        try:
            ok = list(getattr(tier, what)(slots, keys, bufs))
            if len(ok) != len(slots):
                raise RuntimeError(f"{what} returned {len(ok)} flags for {len(slots)} blocks")
            return ok
        except Exception as e:
            self.warn(f"{what}{t}", "kvbm tier %r: %s of %d blocks failed (%s); %s",
                      tier.name, what, len(slots), e, outcome)
            return [False] * len(slots)

    def _views(self, t: int, slots: Sequence[int]) -> list[np.ndarray] | None:
        return self.tiers[t].views(slots) if slots else []

    def _rows(self, t: int) -> np.ndarray | None:
        """Tier ``t``'s slots as rows of one array (``Tier.slot_rows``), or None."""
        return self.tiers[t].slot_rows()

    def _copy_rows(self, fn: Callable[[Sequence[int], np.ndarray, Sequence[int]], None],
                   idx: Sequence[int], rows: np.ndarray, at: Sequence[int]) -> None:
        """``fn(idx, rows, at)`` (one native call), shared across the copy threads."""
        if self._copy_pool is not None and len(idx) > 1:
            with _native.share(self._copy_pool, self._copy_threads):
                fn(idx, rows, at)
        else:
            fn(idx, rows, at)

    def split_copy(self, fn: Callable[[Sequence[int], Sequence[np.ndarray]], None],
                   idx: Sequence[int], bufs: Sequence[np.ndarray]) -> None:
        """Run ``fn(idx, bufs)`` split across the copy threads for large batches.

        numpy and torch copies release the GIL, so disjoint parts copy in parallel and
        the caller's thread takes one part itself. Every part finishes before this
        returns or raises: a slot whose copy failed is settled only after no part of
        it can still be writing.
        """
        k = self._copy_threads
        n = len(idx)
        if self._copy_pool is None or n < 2:
            fn(idx, bufs)
            return
        if _shares(fn):
            # One address table, the runs claimed in chunks by this thread and the
            # helpers as they start (``_native.share``): no fixed halves to wait for.
            with _native.share(self._copy_pool, k):
                fn(idx, bufs)
            return
        if n < 2 * k:
            fn(idx, bufs)
            return
        step = -(-n // k)
        futs = [self._copy_pool.submit(fn, idx[i:i + step], bufs[i:i + step])
                for i in range(step, n, step)]
        err: BaseException | None = None
        try:
            fn(idx[:step], bufs[:step])
        except BaseException as e:
            err = e
        for f in futs:
            try:
                f.result()
            except BaseException as e:
                err = err or e
        if err is not None:
            raise err

    # -- operations ----------------------------------------------------------------------
    def save(self, op: SaveOp, source: BlockSource) -> frozenset[int]:
        """Copy engine blocks into a tier; errors of ``source`` propagate (after every part)."""
        with self.foreground.active():
            return self._save(op, source)

    def _save(self, op: SaveOp, source: BlockSource) -> frozenset[int]:
        t0 = time.perf_counter()
        refused = self._claim(op.tier, op.slots)
        todo: Sequence[int] = range(len(op.slots))
        slots, src = op.slots, op.src  # no lease holds any (the common case): no copies
        if refused:
            todo = [i for i in todo if i not in refused]
            slots = [op.slots[i] for i in todo]
            src = [op.src[i] for i in todo]
        failed = set(refused)
        rows = self._rows(op.tier)
        fast = _rows_fn(source, out=True) if rows is not None else None
        views = None if fast is not None else self._views(op.tier, slots)
        if fast is not None:
            assert rows is not None
            self._copy_rows(fast, src, rows, slots)
        elif views is not None:
            self.split_copy(source.copy_out, src, views)
        else:
            keys = [SequenceHash(op.keys[i]) for i in todo]
            ok = self._staged_write(op.tier, slots, keys, src, source)
            failed.update(i for i, g in zip(todo, ok) if not g)
        self._commit(op.tier, op.slots, op.keys, failed)
        self.count(f"offload:{self.tiers[op.tier].name}", len(op.slots) - len(failed),
                   time.perf_counter() - t0, len(failed))
        return frozenset(failed)

    def _staged_write(self, t: int, slots: list[int], keys: list[SequenceHash], src: list[int],
                      source: BlockSource) -> list[bool]:
        """Engine blocks into a tier that stores through ``write``, pipelined.

        The batch goes in parts: while the writer thread writes part ``i``, this thread
        copies part ``i+1`` into staging, so the copy and the I/O overlap. Every part
        already handed to the writer finishes before this returns or raises (a source
        error stops the copying, never a write in flight).

        A source in plain host memory (``views``, as ``ContiguousBlocks``) is written
        from its own blocks, with no staging copy: ``offload`` returns only after the
        write, so the caller's bytes are read while it waits, as ``copy_out`` would.
        """
        direct = _views_of(source, src)
        if direct is not None and all(v.flags.c_contiguous for v in direct):
            return self._write(t, slots, keys, direct)
        n = len(slots)
        step = n if n < 2 * _PIPELINE_MIN else max(_PIPELINE_MIN, -(-n // _PIPELINE_PARTS))
        ok = [False] * n
        parts: list[tuple[int, list[np.ndarray], Future[list[bool]]]] = []
        err: BaseException | None = None
        for a in range(0, n, step):
            b = min(n, a + step)
            bufs = self.staging.acquire(b - a)
            try:
                self.split_copy(source.copy_out, src[a:b], bufs)
            except BaseException as e:
                self.staging.release(bufs)
                err = e
                break
            if step == n:  # one part: nothing to overlap, write here
                done: Future[list[bool]] = Future()
                done.set_result(self._write(t, slots[a:b], keys[a:b], bufs))
            else:
                done = self._writer.submit(self._write, t, slots[a:b], keys[a:b], bufs)
            parts.append((a, bufs, done))
        for a, bufs, done in parts:
            try:
                got = done.result()
            finally:
                self.staging.release(bufs)
            ok[a:a + len(got)] = got
        if err is not None:
            raise err
        return ok

    def copy(self, op: CopyOp) -> frozenset[int]:
        """Copy blocks from one tier to another (the cascade)."""
        t0 = time.perf_counter()
        n = len(op.keys)
        keys = [SequenceHash(k) for k in op.keys]
        failed = self._claim(op.dst_tier, op.dst_slots)
        bufs: list[np.ndarray] = []
        waited = 0.0  # yielding to loads and saves (foreground.py): not the path's time
        try:
            src = self._views(op.src_tier, op.src_slots)
            if src is None:
                waited += self.foreground.yield_to()
                bufs = self.staging.acquire(n)
                good = self._read(op.src_tier, op.src_slots, keys, bufs)
                src = bufs
                failed.update(i for i, g in enumerate(good) if not g)
            todo = [i for i in range(n) if i not in failed]
            dst = self._views(op.dst_tier, [op.dst_slots[i] for i in todo])
            if dst is not None:
                self.split_copy(_copy_from([src[i] for i in todo]), range(len(todo)), dst)
            else:
                ws, wk, wb = ([op.dst_slots[i] for i in todo], [keys[i] for i in todo],
                              [src[i] for i in todo])
                ok, w = self.foreground.in_parts(
                    lambda a, b: self._write(op.dst_tier, ws[a:b], wk[a:b], wb[a:b]), len(todo),
                    self.tiers[op.dst_tier].cascade_part_blocks)
                waited += w
                failed.update(i for i, g in zip(todo, ok) if not g)
        except Exception as e:
            self.warn("copy", "kvbm: copy %r -> %r failed (%s); blocks skipped",
                      self.tiers[op.src_tier].name, self.tiers[op.dst_tier].name, e)
            failed = set(range(n))
        finally:
            if bufs:
                self.staging.release(bufs)
        self._commit(op.dst_tier, op.dst_slots, op.keys, failed)
        self.count(f"offload:{self.tiers[op.dst_tier].name}", n - len(failed),
                   time.perf_counter() - t0 - waited, len(failed))
        return frozenset(failed)

    def probe(self, op: ProbeOp, timeout: float | None = None) -> int:
        """How many leading keys shared tier ``op.tier`` holds; 0 past ``timeout`` (a miss)."""
        timeout = self.probe_timeout_s if timeout is None else timeout
        tier = self.tiers[op.tier]
        keys = [SequenceHash(k) for k in op.keys]
        with self._lock:
            if self._probes_running >= self._probe_threads:
                self.probe_timeouts += 1
                return 0  # every probe thread waits on a hung server already
            self._probes_running += 1

        def run() -> list[bool]:
            try:
                return list(tier.probe(keys))
            finally:
                with self._lock:
                    self._probes_running -= 1

        try:
            found = self._probe_pool.submit(run).result(timeout=timeout)
            if len(found) != len(keys):
                raise RuntimeError(f"probe returned {len(found)} flags for {len(keys)} keys")
        except TimeoutError:
            with self._lock:
                self.probe_timeouts += 1
            self.warn(f"p{op.tier}", "kvbm tier %r: probe took longer than %.2fs "
                      "(probe_timeout_s); treated as misses", tier.name, timeout)
            return 0
        except Exception as e:
            self.warn(f"p{op.tier}", "kvbm tier %r: probe failed (%s); treated as misses",
                      tier.name, e)
            return 0
        n = 0
        while n < len(found) and found[n]:
            n += 1
        return n

    def discard(self, op: DiscardOp) -> None:
        """Let a tier forget blocks the registry dropped (a served slot leaves service first)."""
        m = self.served.get(op.tier)
        if m is not None:
            m.drop(op.slots)
        try:
            self.tiers[op.tier].discard(op.slots, [SequenceHash(k) for k in op.keys])
        except Exception as e:
            self.warn(f"d{op.tier}", "kvbm tier %r: discard failed (%s)",
                      self.tiers[op.tier].name, e)

    def load(self, ops: Sequence[LoadOp], dest: BlockDestination,
             on_layer: Callable[[int], None] | None = None) -> Report:
        """Read blocks into engine memory (and promote those from lower tiers).

        With ``on_layer`` the engine is filled layer by layer (``dest.copy_layer_in``)
        and ``on_layer(i)`` is called once layer ``i`` of every block is in place; an
        error of one operation's destination then fails that operation only.
        Otherwise whole blocks are copied and a destination error propagates.
        """
        with self.foreground.active():
            return self._load(ops, dest, on_layer)

    def _load(self, ops: Sequence[LoadOp], dest: BlockDestination,
              on_layer: Callable[[int], None] | None) -> Report:
        report: Report = {}
        held: list[np.ndarray] = []
        try:
            layered = on_layer is not None
            t0 = time.perf_counter()
            got = [self._sources(op, dest, held, copy_now=not layered) for op in ops]
            srcs = [src for src, _ in got]
            # A batch copied whole (the rows' path) has no block to look for a failure in.
            bad: list[set[int]] = [set() if whole else {i for i, s in enumerate(src) if s is None}
                                   for src, whole in got]
            if on_layer is not None:
                self._fill_layers(ops, dest, srcs, bad, on_layer)
                self._count_loads(ops, bad, time.perf_counter() - t0)
            for op, src, b in zip(ops, srcs, bad):
                report[op.op_id] = frozenset(b)
                if op.promote_op:
                    report[op.promote_op] = self._promote(op, src, b)
        finally:
            if held:
                self.staging.release(held)
        return report

    def _sources(self, op: LoadOp, dest: BlockDestination, held: list[np.ndarray],
                 copy_now: bool) -> tuple[list[Any], bool]:
        """Each block's bytes in its tier: a view, a staging buffer read into, or the
        destination's own memory read into (``_Direct``); None where the read failed.
        With it, whether every block was copied by the rows' path (then none failed).

        With ``copy_now`` each tier's blocks are copied into ``dest`` as soon as they
        are read (whole blocks), and the path is timed with the copy.
        """
        n = len(op.slots)
        out: list[Any] = [None] * n
        copied = 0
        groups: dict[int, list[int]] = {}
        tiers = op.tiers
        if n and tiers.count(tiers[0]) == n:  # all from one tier (the common case)
            groups[tiers[0]] = list(range(n))
        else:
            for i, t in enumerate(tiers):
                groups.setdefault(t, []).append(i)
        for t, members in sorted(groups.items()):
            if op.promote_op:  # promoted blocks read into their slots (staging.py)
                members = read_into_promotion(self, op, t, members, dest, out, copy_now)
                if not members:
                    continue
            t0 = time.perf_counter()
            whole = len(members) == n  # (then ``members`` is ``range(n)``)
            slots = op.slots if whole else [op.slots[i] for i in members]
            rows = self._rows(t) if copy_now else None
            fast = _rows_fn(dest, out=False) if rows is not None else None
            if fast is not None and op.promote_op and any(
                    op.promote_slots[i] >= 0 for i in members):
                fast = None  # blocks promoted from here need their buffers after the copy
            if fast is not None:
                # A memory tier's rows straight into the engine by row number: no view.
                assert rows is not None
                self._copy_rows(fast, op.dst if whole else [op.dst[i] for i in members], rows,
                                slots)
                copied += len(members)
                if whole:
                    out[:] = [_COPIED] * n
                else:
                    for i in members:
                        out[i] = _COPIED
                self.count(f"onboard:{self.tiers[t].name}", len(members),
                           time.perf_counter() - t0)
                continue
            views = self._views(t, slots)
            direct = None
            if views is not None:
                bufs = views
                ok = [True] * len(members)
            else:
                keys = [SequenceHash(op.keys[i]) for i in members]
                direct = _views_of(dest, [op.dst[i] for i in members]) if copy_now else None
                if direct is not None:
                    # Plain engine memory: the tier reads straight into it, sparing a
                    # staging copy. A failed block's bytes there are not part of the prefix.
                    bufs = direct
                elif copy_now and read_staged_parts(self, op, t, members, dest, out, t0):
                    continue  # read in parts, each copied while the next is read
                else:
                    bufs = self.staging.acquire(len(members))
                    held.extend(bufs)
                ok = self._read(t, slots, keys, bufs)
            for i, b, g in zip(members, bufs, ok):
                if g:
                    out[i] = _Direct(b) if direct is not None else b
            if copy_now and direct is None:
                todo = [i for i, g in zip(members, ok) if g]
                self.split_copy(dest.copy_in, [op.dst[i] for i in todo], [out[i] for i in todo])
            if copy_now:
                nfail = ok.count(False)
                self.count(f"onboard:{self.tiers[t].name}", len(ok) - nfail,
                           time.perf_counter() - t0, nfail)
        return out, copied == n

    def _count_loads(self, ops: Sequence[LoadOp], bad: list[set[int]], seconds: float) -> None:
        """Layer-wise loads copy all tiers' blocks together: share the time by blocks."""
        per: dict[int, list[int]] = {}
        total = sum(len(op.tiers) for op in ops)
        for op, b in zip(ops, bad):
            for i, t in enumerate(op.tiers):
                per.setdefault(t, [0, 0])[i in b] += 1
        for t, (good, failed) in per.items():
            self.count(f"onboard:{self.tiers[t].name}", good,
                       seconds * (good + failed) / max(1, total), failed)

    def _fill_layers(self, ops: Sequence[LoadOp], dest: Any, srcs: list[list[Any]],
                     bad: list[set[int]], on_layer: Callable[[int], None]) -> None:
        layers = int(getattr(dest, "num_layers", self.layout.model.num_layers))
        try:
            for li in range(layers):
                for op, src, b in zip(ops, srcs, bad):
                    todo = [i for i in range(len(src)) if i not in b]
                    if not todo:
                        continue
                    try:
                        dest.copy_layer_in(li, [op.dst[i] for i in todo],
                                           [_raw(src[i]) for i in todo])
                    except Exception as e:  # a bad block id: that load fails, not the step
                        self.warn("dest", "kvbm: load %d into engine blocks failed (%s)",
                                  op.op_id, e)
                        b.update(todo)
                on_layer(li)
        finally:
            sync = getattr(dest, "synchronize", None)
            if callable(sync):
                sync()

    def _promote(self, op: LoadOp, src: list[Any], bad: set[int]) -> frozenset[int]:
        """Write blocks read from lower tiers into their reserved upper-tier slots."""
        t = op.promote_tier
        pos = [i for i, s in enumerate(op.promote_slots) if s >= 0]
        slots = [op.promote_slots[i] for i in pos]
        failed = {k for k, i in enumerate(pos) if i in bad}
        failed |= self._claim(t, slots)
        todo = [k for k in range(len(pos)) if k not in failed and not isinstance(src[pos[k]], InSlot)]
        bufs = [_raw(src[pos[k]]) for k in todo]
        try:
            views = self._views(t, [slots[k] for k in todo])
            if views is not None:
                self.split_copy(_copy_from(bufs), range(len(todo)), views)
            else:
                ok = self._write(t, [slots[k] for k in todo],
                                 [SequenceHash(op.keys[pos[k]]) for k in todo], bufs)
                failed.update(k for k, g in zip(todo, ok) if not g)
        except Exception as e:
            self.warn("promote", "kvbm: promotion into %r failed (%s)", self.tiers[t].name, e)
            failed = set(range(len(pos)))
        self._commit(t, slots, [op.keys[i] for i in pos], failed)
        return frozenset(failed)

    def run(self, plan: Plan, engine: Any = None) -> Report:
        """Run a whole plan in order: discards, probes, loads, saves, copies."""
        report: Report = {}
        for d in plan.discards:
            self.discard(d)
        for p in plan.probes:
            n = self.probe(p)
            report[p.op_id] = frozenset() if n >= len(p.keys) else frozenset({n})
        if plan.loads:
            report.update(self.load(plan.loads, engine))
        for s in plan.saves:
            report[s.op_id] = self.save(s, engine)
        for c in plan.copies:
            report[c.op_id] = self.copy(c)
        return report

    # -- lifecycle -----------------------------------------------------------------------
    def recover(self) -> list[list[tuple[int, SequenceHash]]]:
        """Blocks each tier found in storage at start; a tier that fails recovers none."""
        out: list[list[tuple[int, SequenceHash]]] = []
        for t in self.tiers:
            try:
                out.append(list(t.recover()))
            except Exception as e:
                log.warning("kvbm tier %r: recovering stored blocks failed (%s); starting it "
                            "empty", t.name, e)
                out.append([])
        return out

    def stats(self) -> dict[str, Any]:
        """Per-path counters and the tiers' own."""
        with self._lock:
            paths = {k: {"blocks": v.blocks, "bytes": v.bytes, "seconds": v.seconds,
                         "call_seconds": v.call_seconds, "gbps": v.gbps,
                         "failures": v.failures} for k, v in self.paths.items()}
        return {"paths": paths, "probe_timeouts": self.probe_timeouts}

    def close(self, timeout: float | None = 60.0) -> bool:
        """Wait up to ``timeout`` for background work, then close every tier; idempotent.

        Returns False when background work was still running (a hung server): the
        tiers are closed anyway, and that work fails as the tiers go.
        """
        if self._closed:
            return True
        self._closed = True
        done = self.flush(timeout)
        if not done:
            log.warning("kvbm: background transfers still running after %.0fs; closing the "
                        "tiers under them (those blocks are not stored)", timeout or 0)
        self._io.shutdown(wait=done, cancel_futures=True)
        self._writer.shutdown(wait=done)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=done)
        # Reverse chain order: a tier serving peers stops before the arena it serves goes.
        for t in reversed(self.tiers):
            try:
                t.close()
            except Exception as e:
                log.warning("kvbm tier %r: close failed (%s)", t.name, e)
        return done

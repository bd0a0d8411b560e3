"""KvBlockManager: one chain of tiers behind match, offload and onboard.

The manager keeps the two halves of the design apart: metadata (hashing, one
``BlockRegistry`` per tier, pins, policies, slot choice) runs under one lock and is
O(1) per block; data (each tier's copies and I/O) runs outside the lock, batched,
in the caller's thread for the first tier and on worker threads for the write-through
cascade to lower tiers.

Faults in a tier never reach the caller: a failed write is a skipped block, a failed
read is a miss, each counted and logged (at most once a second per tier).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .config import KvbmSettings, TierConfig, load_settings, tier_names, validate_tier
from .errors import ConfigError, PluginError
from .events import BlockEvent, EventBus, EventKind
from .hashing import BlockHasher, Namespace, SequenceHash
from .layout import BlockDestination, BlockLayout, BlockSource
from .plugins import Plugins, build_plugins
from .policy import AdmissionPolicy, AdmitAll
from .registry import BlockRegistry
from .staging import StagingPool
from .tier import Tier, TierContext

log = logging.getLogger("kvbm")


@dataclass
class PathStats:
    """Blocks, bytes and seconds moved along one transfer path (``offload:host`` …)."""

    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class TierRuntime:
    """A tier of the chain with its registry, admission filter and counters."""

    name: str
    index: int
    tier: Tier
    registry: BlockRegistry
    admission: AdmissionPolicy
    config: TierConfig
    hits: int = 0
    lookups: int = 0
    skipped_writes: int = 0
    failed_writes: int = 0
    failed_reads: int = 0
    _last_warn: float = 0.0

    def warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warn >= 1.0:
            self._last_warn = now
            log.warning("kvbm tier %r: " + msg, self.name, *args)


@dataclass
class Match:
    """A pinned prefix of a request's blocks; release it (or use ``with``) when done.

    ``tiers[i]`` names the tier that holds ``hashes[i]``. Pinned blocks cannot be
    evicted until released.
    """

    hashes: list[SequenceHash]
    tiers: list[str]
    page_size: int
    _pins: list[tuple[TierRuntime, int]] = field(default_factory=list, repr=False)
    _manager: KvBlockManager | None = field(default=None, repr=False)
    _bad: list[tuple[TierRuntime, SequenceHash]] = field(default_factory=list, repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)

    @property
    def num_tokens(self) -> int:
        return len(self.hashes) * self.page_size

    def release(self) -> None:
        """Drop the pins; idempotent."""
        if self._manager is not None:
            self._manager._release(self)
            self._manager = None

    def __enter__(self) -> Match:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class OffloadResult:
    """What ``offload`` wrote to the first tier; lower tiers follow in the background."""

    stored: int = 0
    present: int = 0
    rejected: int = 0
    failed: int = 0


@dataclass
class OnboardResult:
    """How many leading blocks of a match reached the destination intact.

    Only the first ``loaded`` blocks may be used: a block after a failed one is not
    part of a valid prefix.
    """

    loaded: int = 0
    failed: list[int] = field(default_factory=list)


class KvBlockManager:
    """Match, offload and onboard KV blocks through a chain of tiers."""

    def __init__(
        self,
        settings: KvbmSettings,
        plugins: Plugins,
        tiers: list[TierRuntime],
        layout: BlockLayout,
        namespace: Namespace,
        events: EventBus,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.layout = layout
        self.namespace = namespace
        self.events = events
        self.chain = tiers
        self.hasher = BlockHasher(namespace, layout.page_size, settings.hash_algorithm)
        self.page_size = layout.page_size
        self.block_bytes = layout.bytes_per_block
        self._lock = threading.RLock()
        self._staging = StagingPool(self.block_bytes)
        self._executor = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="kvbm-io")
        self._copy_threads = settings.copy_threads
        self._copy_pool = (
            ThreadPoolExecutor(settings.copy_threads - 1, thread_name_prefix="kvbm-copy")
            if settings.copy_threads > 1
            else None
        )
        self._pending: set[Future[None]] = set()
        self._pending_lock = threading.Lock()
        self.paths: dict[str, PathStats] = {}
        self._closed = False

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | dict[str, Any] | KvbmSettings | None = None,
        *,
        plugins: Plugins | None = None,
        **overrides: Any,
    ) -> KvBlockManager:
        """Build the chain a config names (a YAML path, a dict, settings, or env/defaults)."""
        settings = load_settings(config, **overrides)
        plugins = plugins or build_plugins()
        chain = resolve_chain(settings, plugins)
        layout = settings.layout()
        namespace = Namespace(
            model_id=settings.model.name,
            layout_digest=layout.digest,
            tp_rank=settings.tp_rank,
            tp_size=settings.tp_size,
            lora_name=settings.lora_name,
            cache_salt=settings.cache_salt,
        )
        events = EventBus()
        runtimes: list[TierRuntime] = []
        try:
            for i, link in enumerate(chain):
                ctx = TierContext(link.name, namespace, layout, link.num_blocks)
                tier = link.tier_cls(link.config, ctx)
                registry = BlockRegistry(link.name, link.num_blocks, link.eviction, events)
                runtimes.append(TierRuntime(link.name, i, tier, registry, link.admission, link.config))
                registry.restore(tier.recover())
        except Exception:
            for rt in runtimes:
                rt.tier.close()
            raise
        mgr = cls(settings, plugins, runtimes, layout, namespace, events)
        try:
            plugins.chain_built(mgr)
        except BaseException:
            # A plugin that cannot start what the config asked for (a port in use)
            # fails the start; nothing of the chain stays open behind it.
            mgr.close()
            raise
        return mgr

    # -- hashing and match -----------------------------------------------------
    def hash_tokens(self, tokens: Any) -> list[SequenceHash]:
        """Sequence hashes of every complete block of ``tokens``."""
        return self.hasher.hash_tokens(tokens)

    def _as_hashes(self, tokens_or_hashes: Any) -> list[SequenceHash]:
        if isinstance(tokens_or_hashes, (list, tuple)) and tokens_or_hashes and isinstance(
            tokens_or_hashes[0], bytes
        ):
            return list(tokens_or_hashes)
        return self.hash_tokens(tokens_or_hashes)

    def match_prefix(self, tokens_or_hashes: Any) -> Match:
        """Pin the longest cached prefix; stops at the first block no tier holds."""
        hashes = self._as_hashes(tokens_or_hashes)
        match = Match([], [], self.page_size, _manager=self)
        with self._lock:
            for h in hashes:
                for rt in self.chain:
                    rt.lookups += 1
                    slot = rt.registry.pin(h)
                    if slot is not None:
                        rt.hits += 1
                        match.hashes.append(h)
                        match.tiers.append(rt.name)
                        match._pins.append((rt, slot))
                        break
                else:
                    break
        rest = hashes[match.num_blocks :]
        if rest:
            self._match_shared(rest, match)
        if self.events.active:
            self._publish_matched(match)
        return match

    def _match_shared(self, rest: list[SequenceHash], match: Match) -> None:
        """Extend a match with blocks that shared tiers hold but this process never wrote."""
        for rt in self.chain:
            if not rt.tier.shared:
                continue
            try:
                found = rt.tier.probe(rest)
            except Exception as e:
                rt.warn("probe failed (%s); treated as misses", e)
                continue
            n = 0
            while n < len(found) and found[n]:
                n += 1
            if not n:
                continue
            with self._lock:
                for h in rest[:n]:
                    slot = rt.registry.allocate(h)
                    if slot is None:
                        slot = rt.registry.pin(h)
                        if slot is None:
                            return
                    else:
                        rt.registry.commit(slot, pinned=True)
                        rt.hits += 1
                    match.hashes.append(h)
                    match.tiers.append(rt.name)
                    match._pins.append((rt, slot))
            self._discard_evicted(rt)
            return

    def _publish_matched(self, match: Match) -> None:
        now = time.time()
        by_tier: dict[str, list[SequenceHash]] = {}
        for h, t in zip(match.hashes, match.tiers):
            by_tier.setdefault(t, []).append(h)
        evs = [BlockEvent(EventKind.MATCHED, t, tuple(hs), now) for t, hs in by_tier.items()]
        self._flush_events(evs)

    def _release(self, match: Match) -> None:
        with self._lock:
            for rt, slot in match._pins:
                rt.registry.unpin(slot)
            match._pins = []
            # A block whose read failed is not served again from that tier: drop it
            # (once nobody else pins it) so later matches miss cleanly or go lower.
            dropped: list[tuple[TierRuntime, int, SequenceHash]] = []
            for rt, h in match._bad:
                bad_slot = rt.registry.lookup(h)
                if bad_slot is not None and rt.registry.remove(h):
                    dropped.append((rt, bad_slot, h))
            match._bad = []
            events = self._take_events()
        self._flush_events(events)
        for rt, bad_slot, h in dropped:
            try:
                rt.tier.discard([bad_slot], [h])
            except Exception as e:
                rt.warn("discard failed (%s)", e)

    # -- offload ---------------------------------------------------------------
    def offload(
        self,
        hashes: Sequence[SequenceHash],
        source: BlockSource,
        indices: Sequence[int] | None = None,
        priorities: Sequence[int] | None = None,
    ) -> OffloadResult:
        """Copy complete blocks from ``source`` into the first tier; cascade down after.

        ``indices[i]`` is the source's index of ``hashes[i]`` (default ``i``). Blocks a
        tier already holds are not written again. Returns at once after the first tier;
        ``flush()`` waits for the cascade.
        """
        if indices is None:
            indices = range(len(hashes))
        if len(indices) != len(hashes):
            raise ValueError(f"offload: {len(hashes)} hashes but {len(indices)} source indices")
        res = OffloadResult()
        if not hashes or not self.chain:
            return res
        top = self.chain[0]
        cascade = self.settings.write_through and len(self.chain) > 1
        present: list[tuple[SequenceHash, int]] = []
        keys, idx, slots, prios = self._reserve(top, list(hashes), list(indices), priorities, res,
                                                present if cascade else None)
        if present:
            self._reoffer(present)
        if not keys:
            return res
        t0 = time.perf_counter()
        try:
            ok = self._write_from_source(top, slots, keys, idx, source)
        except BaseException:
            # The caller's source is at fault (bad index, shape): free the reserved
            # slots so nothing half-written stays behind, and let the caller see it.
            with self._lock:
                for s in slots:
                    top.registry.abort(s)
                self._take_events()
            raise
        self._count(f"offload:{top.name}", sum(ok), time.perf_counter() - t0, ok.count(False))
        done_slots, done_keys, done_prios = self._settle(top, slots, keys, prios, ok, cascade)
        res.stored = len(done_keys)
        res.failed = len(keys) - res.stored
        if cascade and done_keys:
            self._submit(self._cascade, 0, done_slots, done_keys, done_prios)
        return res

    def _reserve(
        self,
        rt: TierRuntime,
        hashes: list[SequenceHash],
        indices: list[int],
        priorities: Sequence[int] | None,
        res: OffloadResult | None = None,
        present: list[tuple[SequenceHash, int]] | None = None,
    ) -> tuple[list[SequenceHash], list[int], list[int], list[int]]:
        """Presence, admission and slot allocation for one tier; returns what to write.

        Presence comes first so that an admission filter counts offers only of blocks
        the tier lacks. Blocks the tier already holds go to ``present`` (hash, priority).
        """
        prios = list(priorities) if priorities is not None else [0] * len(hashes)
        with self._lock:
            absent = [k for k, h in enumerate(hashes) if h not in rt.registry]
        if present is not None and len(absent) < len(hashes):
            held = set(absent)
            present.extend((hashes[k], prios[k]) for k in range(len(hashes)) if k not in held)
        if res is not None:
            res.present += len(hashes) - len(absent)
        if not absent:
            return [], [], [], []
        try:
            admit = rt.admission.admit([hashes[k] for k in absent], [prios[k] for k in absent])
        except Exception as e:
            rt.warn("admission filter failed (%s); admitting nothing", e)
            admit = [False] * len(absent)
        keys: list[SequenceHash] = []
        idx: list[int] = []
        slots: list[int] = []
        out_prios: list[int] = []
        with self._lock:
            for k, a in zip(absent, admit):
                if not a:
                    if res is not None:
                        res.rejected += 1
                    continue
                slot = rt.registry.allocate(hashes[k])
                if slot is None:
                    rt.skipped_writes += 1
                    if res is not None:
                        res.failed += 1
                    continue
                keys.append(hashes[k])
                idx.append(indices[k])
                slots.append(slot)
                out_prios.append(prios[k])
        self._discard_evicted(rt)
        return keys, idx, slots, out_prios

    def _settle(
        self,
        rt: TierRuntime,
        slots: list[int],
        keys: list[SequenceHash],
        prios: list[int],
        ok: list[bool],
        pinned: bool,
    ) -> tuple[list[int], list[SequenceHash], list[int]]:
        """Commit the written slots (pinned when a cascade will read them), abort the rest.

        Returns the slots, keys and priorities that were committed.
        """
        done: tuple[list[int], list[SequenceHash], list[int]] = ([], [], [])
        with self._lock:
            for s, k, p, good in zip(slots, keys, prios, ok):
                if good:
                    rt.registry.commit(s, p, pinned=pinned)
                    done[0].append(s)
                    done[1].append(k)
                    done[2].append(p)
                else:
                    rt.registry.abort(s)
                    rt.failed_writes += 1
            events = self._take_events()
        self._flush_events(events)
        return done

    def _reoffer(self, present: list[tuple[SequenceHash, int]]) -> None:
        """Offer blocks the first tier already holds to the next tier again.

        A block offloaded again is a block reused: this repeat offer is what lets a
        frequency filter below admit it (Dynamo counts offers the same way). Only
        blocks the next tier lacks are pinned and cascaded.
        """
        top, nxt = self.chain[0], self.chain[1]
        slots: list[int] = []
        keys: list[SequenceHash] = []
        prios: list[int] = []
        with self._lock:
            for h, p in present:
                if h in nxt.registry:
                    continue
                slot = top.registry.pin(h)
                if slot is None:
                    continue  # still being written: its own cascade will offer it
                slots.append(slot)
                keys.append(h)
                prios.append(p)
        if keys:
            self._submit(self._cascade, 0, slots, keys, prios)

    def _discard_evicted(self, rt: TierRuntime) -> None:
        with self._lock:
            evicted = rt.registry.take_evicted()
        if evicted:
            try:
                rt.tier.discard([s for _, s in evicted], [k for k, _ in evicted])
            except Exception as e:
                rt.warn("discard failed (%s)", e)

    def _write_from_source(
        self,
        rt: TierRuntime,
        slots: list[int],
        keys: list[SequenceHash],
        idx: list[int],
        source: BlockSource,
    ) -> list[bool]:
        views = rt.tier.views(slots)
        if views is not None:
            # A caller's bad source raises here, before any commit.
            self._split_copy(source.copy_out, idx, views)
            return [True] * len(slots)
        bufs = self._staging.acquire(len(slots))
        try:
            source.copy_out(idx, bufs)
            return self._tier_write(rt, slots, keys, bufs)
        finally:
            self._staging.release(bufs)

    def _split_copy(self, fn: Any, idx: Sequence[int], bufs: Sequence[np.ndarray]) -> None:
        """Run ``fn(idx, bufs)`` split across the copy threads for large batches.

        numpy and torch copies release the GIL, so disjoint halves of a batch copy in
        parallel; the caller's thread takes one share itself.
        """
        k = self._copy_threads
        n = len(idx)
        if self._copy_pool is None or n < 2 * k:
            fn(idx, bufs)
            return
        step = -(-n // k)
        futs = [
            self._copy_pool.submit(fn, idx[i : i + step], bufs[i : i + step])
            for i in range(step, n, step)
        ]
        fn(idx[:step], bufs[:step])
        for f in futs:
            f.result()

    def _tier_write(
        self, rt: TierRuntime, slots: list[int], keys: list[SequenceHash], bufs: Sequence[np.ndarray]
    ) -> list[bool]:
        try:
            ok = rt.tier.write(slots, keys, bufs)
            if len(ok) != len(slots):
                raise RuntimeError(f"write returned {len(ok)} flags for {len(slots)} blocks")
            return list(ok)
        except Exception as e:
            rt.warn("write of %d blocks failed (%s); skipped", len(slots), e)
            return [False] * len(slots)

    def _tier_read(
        self, rt: TierRuntime, slots: list[int], keys: list[SequenceHash], bufs: Sequence[np.ndarray]
    ) -> list[bool]:
        try:
            ok = rt.tier.read(slots, keys, bufs)
            if len(ok) != len(slots):
                raise RuntimeError(f"read returned {len(ok)} flags for {len(slots)} blocks")
            return list(ok)
        except Exception as e:
            rt.warn("read of %d blocks failed (%s); treated as misses", len(slots), e)
            return [False] * len(slots)

    def _cascade(
        self, src_index: int, src_slots: list[int], keys: list[SequenceHash], prios: list[int]
    ) -> None:
        """Copy blocks pinned in tier ``src_index`` to the next tier, then unpin them."""
        src = self.chain[src_index]
        dst = self.chain[src_index + 1]
        slot_of = dict(zip(keys, src_slots))
        try:
            w_keys, _, w_slots, w_prios = self._reserve(dst, keys, list(range(len(keys))), prios)
            if not w_keys:
                return
            from_slots = [slot_of[k] for k in w_keys]
            t0 = time.perf_counter()
            views = src.tier.views(from_slots)
            bufs: list[np.ndarray] = []
            try:
                if views is None:
                    bufs = self._staging.acquire(len(w_keys))
                    good_src = self._tier_read(src, from_slots, w_keys, bufs)
                    views = bufs
                else:
                    good_src = [True] * len(w_keys)
                dst_views = dst.tier.views(w_slots)
                if dst_views is not None:
                    for v, d, g in zip(views, dst_views, good_src):
                        if g:
                            np.copyto(d, v)
                    ok = list(good_src)
                else:
                    ok = self._tier_write(dst, w_slots, w_keys, views)
                    ok = [a and b for a, b in zip(ok, good_src)]
            finally:
                if bufs:
                    self._staging.release(bufs)
            self._count(f"offload:{dst.name}", sum(ok), time.perf_counter() - t0, ok.count(False))
            more = src_index + 2 < len(self.chain)
            nxt_slots, nxt_keys, nxt_prios = self._settle(dst, w_slots, w_keys, w_prios, ok, more)
            if more and nxt_keys:
                self._submit(self._cascade, src_index + 1, nxt_slots, nxt_keys, nxt_prios)
        finally:
            with self._lock:
                for s in src_slots:
                    src.registry.unpin(s)

    # -- onboard ---------------------------------------------------------------
    def onboard(
        self,
        match: Match,
        destination: BlockDestination,
        indices: Sequence[int] | None = None,
        promote: bool = True,
    ) -> OnboardResult:
        """Copy a match's blocks into ``destination`` (``indices[i]`` for block ``i``).

        Blocks read from lower tiers are promoted into the first tier. A block that
        fails its read (or checksum) ends the valid prefix at that point.
        """
        n = match.num_blocks
        if indices is None:
            indices = range(n)
        if len(indices) != n:
            raise ValueError(f"onboard: match has {n} blocks but {len(indices)} destination indices")
        res = OnboardResult()
        if n == 0:
            return res
        good = [False] * n
        groups: dict[int, list[int]] = {}
        for i, (rt, _) in enumerate(match._pins):
            groups.setdefault(rt.index, []).append(i)
        promote_keys: list[SequenceHash] = []
        promote_bufs: list[np.ndarray] = []
        held: list[np.ndarray] = []
        try:
            for tindex, members in sorted(groups.items()):
                rt = self.chain[tindex]
                slots = [match._pins[i][1] for i in members]
                keys = [match.hashes[i] for i in members]
                dst_idx = [indices[i] for i in members]
                t0 = time.perf_counter()
                views = rt.tier.views(slots)
                if views is not None:
                    self._split_copy(destination.copy_in, dst_idx, views)
                    ok = [True] * len(members)
                else:
                    direct = _destination_views(destination, dst_idx)
                    if direct is not None:
                        # The destination is plain memory: the tier reads straight into
                        # it, sparing the staging copy. A failed block's bytes there are
                        # not part of the loaded prefix.
                        bufs = direct
                        ok = self._tier_read(rt, slots, keys, bufs)
                        okb = [b for b, g in zip(bufs, ok) if g]
                    else:
                        bufs = self._staging.acquire(len(members))
                        held.extend(bufs)
                        ok = self._tier_read(rt, slots, keys, bufs)
                        okb = [b for b, g in zip(bufs, ok) if g]
                        destination.copy_in([d for d, g in zip(dst_idx, ok) if g], okb)
                    if promote and tindex > 0:
                        promote_keys.extend(k for k, g in zip(keys, ok) if g)
                        promote_bufs.extend(okb)
                nfail = ok.count(False)
                rt.failed_reads += nfail
                self._count(f"onboard:{rt.name}", len(ok) - nfail, time.perf_counter() - t0, nfail)
                for i, g in zip(members, ok):
                    good[i] = g
                    if not g:
                        match._bad.append((rt, match.hashes[i]))
            if promote_keys:
                self._promote(promote_keys, promote_bufs)
        finally:
            if held:
                self._staging.release(held)
        loaded = 0
        while loaded < n and good[loaded]:
            loaded += 1
        res.loaded = loaded
        res.failed = [i for i, g in enumerate(good) if not g]
        return res

    def _promote(self, keys: list[SequenceHash], bufs: list[np.ndarray]) -> None:
        top = self.chain[0]
        w_keys, w_idx, w_slots, w_prios = self._reserve(top, keys, list(range(len(keys))), None)
        if not w_keys:
            return
        views = top.tier.views(w_slots)
        if views is not None:
            for v, i in zip(views, w_idx):
                np.copyto(v, bufs[i])
            ok = [True] * len(w_keys)
        else:
            ok = self._tier_write(top, w_slots, w_keys, [bufs[i] for i in w_idx])
        self._settle(top, w_slots, w_keys, w_prios, ok, pinned=False)

    # -- async forms -----------------------------------------------------------
    async def match_prefix_async(self, tokens_or_hashes: Any) -> Match:
        """``match_prefix`` on a worker thread (shared tiers may do network I/O)."""
        return await _in_thread(self.match_prefix, tokens_or_hashes)

    async def offload_async(self, *args: Any, **kwargs: Any) -> OffloadResult:
        """``offload`` on a worker thread; awaits the first tier's copy."""
        return await _in_thread(self.offload, *args, **kwargs)

    async def onboard_async(self, *args: Any, **kwargs: Any) -> OnboardResult:
        """``onboard`` on a worker thread."""
        return await _in_thread(self.onboard, *args, **kwargs)

    # -- bookkeeping -----------------------------------------------------------
    def _submit(self, fn: Any, *args: Any) -> None:
        fut = self._executor.submit(fn, *args)
        with self._pending_lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._pending_lock:
            self._pending.discard(fut)
        exc = fut.exception()
        if exc is not None:
            log.error("kvbm cascade failed: %r", exc, exc_info=exc)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every background cascade finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._pending_lock:
                pending = list(self._pending)
            if not pending:
                return
            for f in pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                with contextlib.suppress(Exception):
                    f.result(timeout=left)

    def _count(self, path: str, blocks: int, seconds: float, failures: int = 0) -> None:
        with self._lock:
            st = self.paths.get(path)
            if st is None:
                st = self.paths[path] = PathStats()
            st.blocks += blocks
            st.bytes += blocks * self.block_bytes
            st.seconds += seconds
            st.failures += failures

    def _take_events(self) -> list[BlockEvent]:
        if not self.events.active:
            return []
        out: list[BlockEvent] = []
        for rt in self.chain:
            out.extend(rt.registry.take_events())
        return out

    def _flush_events(self, events: list[BlockEvent]) -> None:
        if events:
            self.events.publish(events)

    def release_all_evictable(self) -> None:
        """Drop every unpinned block from every tier."""
        with self._lock:
            for rt in self.chain:
                while rt.registry.evict() is not None:
                    pass
        for rt in self.chain:
            self._discard_evicted(rt)

    def stats(self) -> dict[str, Any]:
        """Counters per tier and per transfer path."""
        with self._lock:
            tiers = {}
            for rt in self.chain:
                r = rt.registry
                tiers[rt.name] = {
                    "type": rt.config.type,
                    "capacity_blocks": r.capacity,
                    "used_blocks": r.num_used,
                    "evictable_blocks": r.num_evictable,
                    "hits": rt.hits,
                    "lookups": rt.lookups,
                    "evictions": r.evictions,
                    "skipped_writes": rt.skipped_writes,
                    "failed_writes": rt.failed_writes,
                    "failed_reads": rt.failed_reads,
                    **rt.tier.stats(),
                }
            paths = {
                k: {"blocks": v.blocks, "bytes": v.bytes, "seconds": v.seconds,
                    "gbps": v.gbps, "failures": v.failures}
                for k, v in self.paths.items()
            }
        return {"tiers": tiers, "paths": paths, "events_dropped": self.events.dropped_batches}

    def close(self) -> None:
        """Finish the cascade, tell plugins, close tiers; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout=60)
        self._executor.shutdown(wait=True)
        if self._copy_pool is not None:
            self._copy_pool.shutdown(wait=True)
        try:
            self.plugins.shutdown(self)
        finally:
            for rt in self.chain:
                try:
                    rt.tier.close()
                except Exception as e:
                    log.warning("kvbm tier %r: close failed (%s)", rt.name, e)
            self.events.close()

    def __enter__(self) -> KvBlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_T = TypeVar("_T")


def _destination_views(destination: BlockDestination, indices: Sequence[int]) -> list[np.ndarray] | None:
    """Writable views of the destination's blocks, where it offers them (plain memory)."""
    views = getattr(destination, "views", None)
    return views(indices) if callable(views) else None


async def _in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


@dataclass
class ChainLink:
    """One resolved tier entry: its validated config, class, size and policies."""

    name: str
    config: TierConfig
    tier_cls: type[Tier]
    num_blocks: int
    eviction: Any
    admission: AdmissionPolicy


def resolve_chain(settings: KvbmSettings, plugins: Plugins, load: bool = True) -> list[ChainLink]:
    """Validate every tier (step two) and build its policies; warn on a chain that makes no sense."""
    if not settings.tiers:
        raise ConfigError("key 'tiers': the chain is empty; give at least one tier, e.g. [{type: host, capacity: 4GiB}]")
    layout = settings.layout()
    bb = layout.bytes_per_block
    links: list[ChainLink] = []
    for spec, name in zip(settings.tiers, tier_names(settings.tiers)):
        if spec.type not in plugins.tiers:
            raise ConfigError(
                f"tier {name!r}: key 'type': value {spec.type!r} is not a known tier type; "
                f"known: {', '.join(plugins.tiers.names()) or 'none'} (see `kvbm plugins`)"
            )
        entry = plugins.tiers.get(spec.type)
        assert entry.config_model is not None
        cfg = validate_tier(spec, name, entry.config_model)
        n = cfg.resolve_num_blocks(bb)
        tier_cls: Any = entry.load() if load else Tier
        try:
            ev_cls = plugins.policies.get_kind("eviction", cfg.policy).load()
            eviction = ev_cls(n, **cfg.policy_options)
        except (PluginError, TypeError, ValueError) as e:
            raise ConfigError(f"tier {name!r}: key 'policy': value {cfg.policy!r}: {e}") from None
        adm_name = cfg.admission or getattr(tier_cls, "default_admission", None)
        admission: AdmissionPolicy
        if adm_name is None or adm_name == "all":
            admission = AdmitAll()
        else:
            try:
                adm_cls = plugins.policies.get_kind("admission", adm_name).load()
                admission = adm_cls(**cfg.admission_options)
            except PluginError as e:
                if cfg.admission is None:
                    # The tier's default filter is not installed: admit all rather than
                    # refuse to start, and say so.
                    log.warning("kvbm tier %r: default admission %r unavailable (%s); admitting all",
                                name, adm_name, e)
                    admission = AdmitAll()
                else:
                    raise ConfigError(f"tier {name!r}: key 'admission': value {adm_name!r}: {e}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"tier {name!r}: key 'admission_options': {e}") from None
        links.append(ChainLink(name, cfg, tier_cls, n, eviction, admission))
    if settings.write_through:
        for upper, lower in zip(links, links[1:]):
            if lower.num_blocks < upper.num_blocks:
                log.warning(
                    "kvbm: tier %r holds %d blocks, fewer than tier %r above it (%d); in a "
                    "write-through chain every block of %r is also written to %r, so raise "
                    "%r's capacity to at least %d blocks (%d bytes)",
                    lower.name, lower.num_blocks, upper.name, upper.num_blocks,
                    upper.name, lower.name, lower.name, upper.num_blocks, upper.num_blocks * bb,
                )
    return links

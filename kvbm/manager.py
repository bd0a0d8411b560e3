"""KvBlockManager: one chain of tiers behind match, offload and onboard, in one process.

The manager is the planner and the executor side by side (``kvbm.planner``,
``kvbm.executor``): every call asks the planner for a plan, runs it with the
executor, and hands the executor's report back to the planner, which settles the
slots and plans what follows. The first tier's copy runs in the caller's thread;
the write-through cascade to lower tiers runs on the executor's I/O threads.
Engine connectors (Hugging Face, SGLang) and ``kvbm bench`` use this class; vLLM's
connector drives the same planner from its scheduler and the same executor in each
worker, so there is one data path.

Faults in a tier never reach the caller: a failed write is a skipped block, a failed
read is a miss, each counted and logged (at most once a second per tier).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from . import _registry_native
from .chain import ChainLink, build_tiers, resolve_chain, tier_states
from .config import KvbmSettings, load_settings
from .errors import KvbmError, LayoutError, TokenError
from .events import EventBus
from .executor import Executor
from .hashing import BlockHasher, Namespace, SequenceHash
from .layout import BlockDestination, BlockLayout, BlockSource
from .pathstats import PathStats
from .plan import Plan, Report
from .planner import Match, Planner, TierState
from .plugins import Plugins, build_plugins

log = logging.getLogger("kvbm")

#: ``TierState`` under its former name: one tier of the chain with its registry.
TierRuntime = TierState

__all__ = ["ChainLink", "KvBlockManager", "Match", "OffloadResult", "OnboardResult",
           "PathStats", "TierRuntime", "resolve_chain"]


@dataclass
class OffloadResult:
    """What ``offload`` wrote to the chain; lower tiers follow in the background.

    ``stored``: written now (to the first tier, or to a lower one when the first was
    full); ``present``: already held; ``rejected``: refused by the first tier's
    admission filter; ``failed``: the write failed; ``not_saved``: no tier had a free
    slot (every one pinned or being written).
    """

    stored: int = 0
    present: int = 0
    rejected: int = 0
    failed: int = 0
    not_saved: int = 0


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

    def __init__(self, settings: KvbmSettings, plugins: Plugins, planner: Planner,
                 executor: Executor, layout: BlockLayout, namespace: Namespace,
                 events: EventBus) -> None:
        self.settings = settings
        self.plugins = plugins
        self.planner = planner
        self.executor = executor
        self.layout = layout
        self.namespace = namespace
        self.events = events
        self.hasher = BlockHasher(namespace, layout.page_size, settings.hash_algorithm)
        self.page_size = layout.page_size
        self.block_bytes = layout.bytes_per_block
        self._closed = False

    @property
    def chain(self) -> list[TierState]:
        """The tiers in chain order: ``.name``, ``.index``, ``.tier``, ``.config``, ``.registry``."""
        return self.planner.tiers

    @property
    def paths(self) -> dict[str, PathStats]:
        """Blocks, bytes and seconds per transfer path (``offload:host``, ``onboard:disk`` …)."""
        return self.executor.paths

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | dict[str, Any] | KvbmSettings | None = None,
        *,
        plugins: Plugins | None = None,
        physical: str = "",
        **overrides: Any,
    ) -> KvBlockManager:
        """Build the chain a config names (a YAML path, a dict, settings, or env/defaults).

        ``physical`` is an engine's physical block layout (``BlockLayout.physical``, as an
        engine connector's worker reports it) when this manager is to read the blocks
        that engine stored; blocks of another physical layout are never matched.
        """
        plugins = plugins or build_plugins()
        settings = load_settings(config, tier_types=plugins.tiers, **overrides)
        links = resolve_chain(settings, plugins)
        layout = replace(settings.layout(), physical=physical)
        namespace = Namespace(
            model_id=settings.model.name,
            layout_digest=layout.digest,
            tp_rank=settings.tp_rank,
            tp_size=settings.tp_size,
            lora_name=settings.lora_name,
            cache_salt=settings.cache_salt,
        )
        events = EventBus()
        tiers = build_tiers(links, namespace, layout)
        executor = Executor(tiers, layout, copy_threads=_copy_threads(settings),
                            io_threads=settings.io_threads,
                            probe_timeout_s=settings.probe_timeout_s,
                            background_yield_s=settings.background_yield_ms / 1e3)
        try:
            states = tier_states(links, events)
            for ts, tier, blocks in zip(states, tiers, executor.recover()):
                ts.tier = tier
                ts.registry.restore(blocks)
            planner = Planner(states, page_size=layout.page_size,
                              write_through=settings.write_through, events=events)
            executor.serve_peers()
        except BaseException:
            executor.close(timeout=0)
            raise
        mgr = cls(settings, plugins, planner, executor, layout, namespace, events)
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
        """Pin the longest cached prefix; stops at the first block no tier holds.

        Where the registries end early, shared tiers (S3, peers) are probed for blocks
        other instances wrote; the caller waits at most ``probe_timeout_s`` for them.
        """
        self._check_open()
        hashes = self._as_hashes(tokens_or_hashes)
        if hashes and isinstance(tokens_or_hashes, (list, tuple)) and isinstance(
                tokens_or_hashes[0], bytes) and not _registry_native.all_keys(hashes):
            _check_hashes("match_prefix", hashes, fix="")  # names the bad item
        match = self.planner.match(hashes)
        rest = hashes[match.num_blocks:]
        if rest:
            probes = self.planner.probe_ops(rest)
            if probes:
                found = {p.tier: self.executor.probe(p) for p in probes}
                self.planner.adopt(rest, found, into=match)
                self._run_discards(self.planner.take_plan())
        return match

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
        tier already holds are not written again. Returns once the first copy is done;
        ``flush()`` waits for the cascade. An error of ``source`` (a bad index or
        shape) propagates after every reserved slot was freed.
        """
        self._check_open()
        if indices is None:
            indices = range(len(hashes))
        if len(indices) != len(hashes):
            raise ValueError(f"offload: {len(hashes)} hashes but {len(indices)} source indices")
        if priorities is not None and len(priorities) != len(hashes):
            raise ValueError(f"offload: {len(hashes)} hashes but {len(priorities)} priorities; "
                             "give one priority per block or none")
        # Per item, in Python: cache-cold (the engine's case) a loop over 64 items costs
        # less than a ctypes call or set/min/max passes (measured: docs/benchmarks/host.md).
        _check_hashes("offload", hashes)
        _check_engine("offload", "source", source, "copy_out")
        _check_indices("offload", indices, source)
        if priorities is not None:
            for k, p in enumerate(priorities):
                if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= p <= 100:
                    raise KvbmError(f"offload: priorities[{k}] is {type(p).__name__} {p!r:.40}, "
                                    "not an integer from 0 to 100")
        sr = self.planner.plan_save(list(hashes), list(indices), priorities)
        res = OffloadResult(present=sr.present, rejected=sr.rejected, not_saved=sr.not_saved)
        plan = sr.plan
        self._run_discards(plan)
        report: Report = {}
        try:
            for op in plan.saves:
                report[op.op_id] = self.executor.save(op, source)
        except BaseException:
            # The caller's source is at fault: free every reserved slot, then raise.
            self._settle_failed(plan)
            raise
        for op in plan.saves:
            res.stored += len(op.slots) - len(report[op.op_id])
            res.failed += len(report[op.op_id])
        if plan.copies:
            # Repeat offers of blocks the first tier holds: copies, in the background.
            self._background(Plan(copies=plan.copies))
        self._follow(report)
        return res

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
        fails its read (or checksum) ends the valid prefix at that point and is
        dropped from its tier once the match is released. A match of another manager,
        or one already released, is refused with ``KvbmError``.
        """
        self._check_open()
        n = match.num_blocks
        if indices is None:
            indices = range(n)
        self.planner.check(match)
        _check_engine("onboard", "destination", destination, "copy_in")
        if len(indices) != n:
            raise ValueError(f"onboard: match has {n} blocks but {len(indices)} destination indices")
        res = OnboardResult()
        if n == 0:
            return res
        op = self.planner.plan_load(match, list(indices), promote=promote)
        try:
            report = self.executor.load([op], destination)
        except BaseException:
            self._settle_failed(Plan(loads=[op]))
            raise
        failed = report[op.op_id]
        res.loaded = min(min(failed, default=n), n)  # the valid prefix: up to the first failure
        res.failed = sorted(failed)
        self._follow(report)
        return res

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

    # -- the loop between planner and executor ----------------------------------
    def _follow(self, report: Report) -> None:
        """Apply a report; run what follows (discards now, cascade copies in the background)."""
        nxt = self.planner.apply(report)
        self._run_discards(nxt)
        if nxt.copies:
            self._background(Plan(copies=nxt.copies))

    def _background(self, plan: Plan) -> None:
        self.executor.submit(self._cascade, plan)

    def _cascade(self, plan: Plan) -> None:
        report: Report = {}
        try:
            report = self.executor.run(plan)
        except BaseException:
            self._settle_failed(plan)
            raise
        self._follow(report)

    def _settle_failed(self, plan: Plan) -> None:
        self._run_discards(self.planner.fail(plan))

    def _run_discards(self, plan: Plan) -> None:
        for d in plan.discards:
            self.executor.discard(d)
        plan.discards = []

    def _check_open(self) -> None:
        if self._closed:
            raise KvbmError("this KvBlockManager is closed; build a new one with "
                            "KvBlockManager.from_config(...)")

    # -- bookkeeping -----------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every background cascade finished; False if ``timeout`` passed first."""
        return self.executor.flush(timeout)

    def release_all_evictable(self) -> None:
        """Drop every unpinned block from every tier."""
        self._run_discards(self.planner.evict_all())

    def stats(self) -> dict[str, Any]:
        """Counters per tier and per transfer path."""
        p = self.planner
        with p.lock:
            tiers = {ts.name: {**p.tier_stats(ts), **ts.tier.stats()} for ts in p.tiers}
            pins = sum(ts.registry.num_pinned for ts in p.tiers)
            leaked = p.leaked_pins
            not_saved = p.not_saved
        ex = self.executor.stats()
        return {"tiers": tiers, "paths": ex["paths"], "events_dropped": self.events.dropped_batches,
                "pinned_blocks": pins, "leaked_pins": leaked, "not_saved_blocks": not_saved,
                "probe_timeouts": ex["probe_timeouts"], "background_jobs": self.executor.busy}

    def close(self, timeout: float | None = None) -> None:
        """Finish the cascade (at most ``timeout`` s), tell plugins, close tiers; idempotent."""
        if self._closed:
            return
        self._closed = True
        wait_s = timeout if timeout is not None else self.settings.close_timeout_s
        if not self.executor.flush(wait_s):
            log.warning("kvbm: the write-through cascade did not finish within %.0fs; closing",
                        wait_s)
        try:
            self.plugins.shutdown(self)
        finally:
            self.executor.close(timeout=0)
            self.events.close()

    def __enter__(self) -> KvBlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_T = TypeVar("_T")

_ENGINE_HINT = "pass ContiguousBlocks, LayerSeparateBlocks or kvbm.engine_blocks(...)"


def _copy_threads(settings: Any) -> int:
    """``copy_threads`` as set; left at its default, only as many as pay on this machine
    (``copy_threads_worth``: one where a second thread copies no faster)."""
    from .engine_blocks._native import copy_threads_worth

    n = int(settings.copy_threads)
    return n if "copy_threads" in settings.model_fields_set else copy_threads_worth(n)


def _check_hashes(call: str, hashes: Sequence[Any],
                  fix: str = "; pass manager.hash_tokens(tokens)") -> None:
    for k, h in enumerate(hashes):
        if not isinstance(h, bytes) or len(h) != 16:
            raise TokenError(f"{call}: hashes[{k}] is {type(h).__name__} {h!r:.40}, not a "
                             f"16-byte sequence hash{fix}")


def _check_engine(call: str, role: str, obj: Any, method: str) -> None:
    if not callable(getattr(obj, method, None)):
        raise KvbmError(f"{call}: {role} is {type(obj).__name__}, not engine blocks; "
                        f"{_ENGINE_HINT}")


def _check_indices(call: str, indices: Sequence[Any], source: Any) -> None:
    """Every index an integer, and inside the source when it says how many blocks it has."""
    n = getattr(source, "num_blocks", None)
    if n is None and hasattr(source, "__len__"):
        n = len(source)
    for k, i in enumerate(indices):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise KvbmError(f"{call}: indices[{k}] is {type(i).__name__} {i!r:.40}, not a "
                            "block index")
        if n is not None and not 0 <= i < n:
            raise LayoutError(f"block index {i} is out of range [0, {n})")


async def _in_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

"""The scheduler side of kvbm's vLLM connector: vLLM's calls, translated into the planner's.

The planner (``kvbm.planner``) holds every registry, pin and slot decision; this
module only keeps what vLLM's scheduling adds: each request's hashes and pending
match, the loads in flight, the shared-tier probes a waiting request asked for, and
the sums of the workers' reports. A plan built here runs in every worker
(``kvbm_vllm.worker``) on its own shard; an operation is applied to the planner once
all ``tp_size`` ranks reported it, so a slot is committed only when every rank wrote
it and a load's pins are dropped only when every rank read it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kvbm.chain import resolve_chain, tier_states
from kvbm.config import KvbmSettings
from kvbm.errors import ConfigError
from kvbm.events import BlockEvent, EventKind
from kvbm.hashing import BlockHasher, SequenceHash
from kvbm.layout import BlockLayout
from kvbm.plan import Plan, Report
from kvbm.planner import Match, Planner
from kvbm.plugins import build_plugins
from kvbm.ranks import Hashers, RankReports, restore_ranks

from .metadata import KvbmConnectorMetadata, KvbmConnectorStats, KvbmHandshakeMetadata

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

log = logging.getLogger("kvbm.vllm")



@dataclass
class _Probe:
    """A request's question to the shared tiers: which of ``keys`` other instances wrote."""

    keys: list[SequenceHash]
    ops: dict[int, int]  # unanswered op id -> tier
    deadline: float
    found: dict[int, int] = field(default_factory=dict)  # tier -> leading keys all ranks hold


@dataclass
class _ReqState:
    request: Any
    supported: bool
    hasher: BlockHasher | None
    hashes: list[SequenceHash] = field(default_factory=list)
    match: Match | None = None  # matched, not yet turned into a load
    first_block: int = 0
    load_async: bool = False
    saved: int = 0  # leading blocks already considered for saving
    inflight_load: int | None = None  # op id of the latest load
    awaiting_recv: bool = False  # vLLM waits for this request in finished_recving
    probe: _Probe | None = None
    probed: bool = False  # asked the shared tiers once already: never again

    def hashes_upto(self, n: int) -> list[SequenceHash]:
        """Sequence hashes of the first ``n`` complete blocks (computed once, extended)."""
        have = len(self.hashes)
        if n > have and self.hasher is not None:
            page = self.hasher.page_size
            toks = self.request.all_token_ids[have * page : n * page]
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.extend(self.hasher.hash_tokens(list(toks), parent=parent))
        return self.hashes[:n]


@dataclass
class _Load:
    req_id: str
    match: Match
    first_block: int


class _EventSink:
    """Receives the registries' events synchronously (the planner publishes under no lock)."""

    active = True

    def __init__(self) -> None:
        self.events: list[BlockEvent] = []

    def publish(self, events: list[BlockEvent]) -> None:
        self.events.extend(events)


class SchedulerSide:
    """vLLM's scheduler-side calls over one ``Planner``."""

    def __init__(self, settings: KvbmSettings, layout: BlockLayout, load_mode: str,
                 publish_events: bool, probe_timeout_s: float = 5.0) -> None:
        if load_mode not in ("auto", "async", "layerwise"):
            raise ConfigError(f"kv_connector_extra_config key 'load_mode': {load_mode!r} is not "
                              "one of auto, async, layerwise")
        if probe_timeout_s <= 0:
            raise ConfigError(f"kv_connector_extra_config key 'probe_timeout_s': "
                              f"{probe_timeout_s!r} must be a positive number of seconds")
        self.settings = settings
        self.layout = layout
        self.page = layout.page_size
        self.tp_size = settings.tp_size
        self.load_mode = load_mode
        self.probe_timeout_s = float(probe_timeout_s)
        self.publish_events = publish_events
        self._sink = _EventSink() if publish_events else None
        links = resolve_chain(settings, build_plugins())
        self.planner = Planner(tier_states(links, self._sink), page_size=self.page,
                               write_through=settings.write_through, events=self._sink)  # type: ignore[arg-type]
        self.tiers = self.planner.tiers
        self.shared = [ts.index for ts in self.tiers if ts.shared]
        self.reqs: dict[str, _ReqState] = {}
        self._hashers = Hashers(settings, layout)
        self._outbox = Plan()
        self._acc = RankReports(self.tp_size)
        self._loads: dict[int, _Load] = {}
        self._saves: dict[int, int] = {}  # save op -> blocks
        self._probes: dict[int, str] = {}  # probe op -> request id
        self._said: set[str] = set()
        self._restored = False
        #: Why reuse is off for this engine (a rank refused its KV cache layout), or None.
        self.disabled: str | None = None
        self._ext: dict[SequenceHash, list[Any]] = {}  # key -> [vllm hash, tokens, holders]
        self._vllm_events: list[Any] = []
        self.restored_blocks = 0
        self.adopted_blocks = 0
        self.loaded_blocks = 0
        self.failed_blocks = 0
        self.saved_blocks = 0
        self.not_saved_blocks = 0
        self._reported: dict[str, int] = {}

    # -- helpers -------------------------------------------------------------------------
    def _say_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(msg, *args)

    def _hasher(self, request: Any) -> BlockHasher:
        lora = request.lora_request.lora_name if getattr(request, "lora_request", None) else None
        return self._hashers.get(lora, getattr(request, "cache_salt", None))

    def _state(self, request: Any) -> _ReqState:
        st = self.reqs.get(request.request_id)
        if st is None or st.request is not request:
            supported = True
            if getattr(request, "mm_features", None):
                supported = False
                self._say_once("mm", "kvbm: requests with multimodal inputs are passed through "
                               "without reuse (their KV depends on more than token ids)")
            elif getattr(request, "prompt_embeds", None) is not None:
                supported = False
                self._say_once("embeds", "kvbm: requests given as prompt embeddings are passed "
                               "through without reuse (they carry no token ids to hash)")
            st = _ReqState(request, supported, self._hasher(request) if supported else None)
            self.reqs[request.request_id] = st
        return st

    def _drop_match(self, st: _ReqState) -> None:
        if st.match is not None:
            st.match.release()
            st.match = None

    # -- blocks found in storage: recovered at start, or written by other instances ----
    def restore(self, ranks: dict[int, KvbmHandshakeMetadata]) -> int:
        """Register the blocks every rank's persistent tiers recovered at start.

        A block is registered only where all ``tp_size`` ranks found the same key in the
        same slot: one registry serves all ranks, and a load needs every rank's shard.
        Runs once, before the first step. Returns the number of blocks registered.
        """
        if self._restored:
            return 0
        self._restored = True
        refused = [m.refused for m in ranks.values() if m.refused]
        physical = {m.physical for m in ranks.values()}
        if refused or len(physical) > 1:
            self.disabled = refused[0] if refused else (
                f"tensor-parallel ranks lay blocks out differently: {sorted(physical)}")
            log.error("kvbm: reuse is off for this engine: %s", self.disabled)
            return 0
        if physical and not self.reqs:
            # Keys are hashed under the engine's physical layout, as the workers store
            # them: another engine's blocks (another kernel) never match by key either.
            self.layout = replace(self.layout, physical=physical.pop())
            self._hashers.relayout(self.layout)
        if self._acc or self._loads or any(ts.registry.num_used for ts in self.tiers):
            log.warning("kvbm: the workers' recovered blocks arrived after scheduling began; "
                        "they are not used (the slots may have been written since)")
            return 0
        total = restore_ranks(self.planner, self.tp_size,
                              [ranks[r].blocks for r in range(self.tp_size) if r in ranks])
        self.restored_blocks = total
        return total

    def _wait_for_probe(self, st: _ReqState, rest: list[SequenceHash]) -> bool:
        """True while the workers probe the shared tiers for ``rest`` (the request waits).

        A request asks once; the answers adopt the found prefix into the planner, so the
        call after them matches it like any registered block. No answer from every
        rank within ``probe_timeout_s`` counts as a miss.
        """
        if not self.shared or st.probed or not rest:
            return False
        if st.probe is None:
            if getattr(st.request, "skip_reading_prefix_cache", False):
                return False
            ops = self.planner.probe_ops(rest)
            st.probe = _Probe(list(rest), {op.op_id: op.tier for op in ops},
                              time.monotonic() + self.probe_timeout_s)
            for op in ops:
                self._probes[op.op_id] = st.request.request_id
            self._outbox.probes.extend(ops)
            return True
        if st.probe.ops:
            if time.monotonic() < st.probe.deadline:
                return True
            self._say_once("probe-timeout", "kvbm: shared tiers did not answer a probe within "
                           "%.1fs (probe_timeout_s); those blocks count as misses",
                           self.probe_timeout_s)
            self._end_probe(st)
        st.probe = None
        st.probed = True
        return False

    def _end_probe(self, st: _ReqState) -> None:
        if st.probe is not None:
            for op in st.probe.ops:
                self._probes.pop(op, None)
                self._acc.drop(op)
            st.probe = None

    def _probe_answered(self, op: int, failed: set[int]) -> None:
        st = self.reqs.get(self._probes.pop(op, ""))
        if st is None or st.probe is None or op not in st.probe.ops:
            return  # the request ended or stopped waiting
        t = st.probe.ops.pop(op)
        # Each rank reported the first key it lacks: the smallest is where the prefix
        # that every rank can read ends.
        st.probe.found[t] = min(failed) if failed else len(st.probe.keys)
        if not st.probe.ops:
            self.adopted_blocks += self.planner.adopt(st.probe.keys, st.probe.found)

    # -- match ---------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        self._drop_match(st)
        if not st.supported or self.disabled is not None:
            return 0, False
        # Never the whole prompt: vLLM must compute at least one token to sample from.
        usable = max(0, request.num_tokens - 1) // self.page
        start = num_computed_tokens // self.page
        if usable <= start:
            return 0, False
        hashes = st.hashes_upto(usable)
        match = self.planner.match(hashes)
        n = match.num_blocks
        if n < usable and self._wait_for_probe(st, hashes[n:]):
            match.release()
            return None, False  # vLLM keeps the request waiting and asks again next step
        if n <= start:
            match.release()
            return 0, False
        # vLLM already holds the first ``start`` blocks; only the rest is loaded.
        self.planner.trim(match, start, n)
        st.match = match
        st.first_block = start
        lower = any(t != self.tiers[0].name for t in match.tiers)
        st.load_async = self.load_mode == "async" or (self.load_mode == "auto" and lower)
        return n * self.page - num_computed_tokens, st.load_async

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        """Loaded tokens by source tier (vLLM's ``CacheHitSource`` from the tier's medium)."""
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        st = self.reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0 or st.inflight_load is None:
            return {}
        load = self._loads.get(st.inflight_load)
        if load is None:
            return {}
        by_medium = {"GPU": CacheHitSource.DEVICE, "CPU": CacheHitSource.HOST,
                     "DISK": CacheHitSource.DISK, "REMOTE": CacheHitSource.P2P}
        names = {ts.name: ts.medium for ts in self.tiers}
        out: dict[Any, int] = {}
        for t in load.match.tiers:
            src = by_medium.get(names[t], CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[src] = out.get(src, 0) + self.page
        if num_external_tokens != sum(out.values()):
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return out

    def update_state_after_alloc(self, request: Any, block_ids: list[int],
                                 num_external_tokens: int) -> None:
        st = self._state(request)
        match = st.match
        if num_external_tokens <= 0 or match is None:
            self._drop_match(st)
            return
        n = -(-num_external_tokens // self.page)
        assert n <= match.num_blocks, (
            f"vLLM asked to load {num_external_tokens} tokens of request {request.request_id} "
            f"but kvbm matched only {match.num_blocks} blocks"
        )
        self.planner.trim(match, 0, n)
        st.match = None
        engine = block_ids[st.first_block : st.first_block + n]
        op = self.planner.plan_load(match, engine, promote=True, req_id=request.request_id,
                                    layerwise=not st.load_async)
        self._outbox.loads.append(op)
        self._loads[op.op_id] = _Load(request.request_id, match, st.first_block)
        st.inflight_load = op.op_id
        st.awaiting_recv = st.load_async

    # -- saves ---------------------------------------------------------------------------
    def build_meta(self, so: SchedulerOutput, block_ids_of: Any) -> KvbmConnectorMetadata:
        """This step's plan: loads, saves of newly complete blocks, and what reports led to."""
        if self.tiers and self.disabled is None:
            self._plan_saves(so, block_ids_of)
        self._outbox.extend(self.planner.take_plan())
        plan, self._outbox = self._outbox, Plan()
        return KvbmConnectorMetadata(plan)

    def _plan_saves(self, so: SchedulerOutput, block_ids_of: Any) -> None:
        keys: list[SequenceHash] = []
        engine: list[int] = []
        owners: list[str] = []
        for req_id, n_sched in so.num_scheduled_tokens.items():
            st = self.reqs.get(req_id)
            if st is None or not st.supported:
                continue
            req = st.request
            # Blocks complete once this step ran: only tokens vLLM already knows (spec
            # decode drafts may be rejected, so they never complete a block here).
            done = min(req.num_computed_tokens + n_sched, req.num_tokens) // self.page
            if done <= st.saved:
                continue
            ids = block_ids_of(req_id)
            hashes = st.hashes_upto(done)
            vhashes = getattr(req, "block_hashes", [])
            for i in range(st.saved, min(done, len(ids))):
                keys.append(hashes[i])
                engine.append(ids[i])
                owners.append(req_id)
                if self._sink is not None and hashes[i] not in self._ext:
                    vh = vhashes[i] if i < len(vhashes) else hashes[i]
                    toks = list(req.all_token_ids[i * self.page : (i + 1) * self.page])
                    self._ext[hashes[i]] = [vh, toks, 0]
            st.saved = done
        if not keys:
            return
        res = self.planner.plan_save(keys, engine, owners=owners)
        if res.not_saved:
            self.not_saved_blocks += res.not_saved
        for op in res.plan.saves:
            self._saves[op.op_id] = len(op.slots)
        self._outbox.extend(res.plan)

    # -- worker reports ------------------------------------------------------------------
    def on_reports(self, reports: dict[int, tuple[int, frozenset[int]]]) -> None:
        """Add up the ranks' reports; apply each operation once every rank reported it."""
        for op, (n, failed) in reports.items():
            if op not in self._probes and not self.planner.is_pending(op):
                continue  # settled already, or its request gave up waiting
            done = self._acc.add(op, n, failed)
            if done is None:
                continue
            if op in self._probes:
                self._probe_answered(op, done)
            else:
                self._settle(op, done)
        self._translate_events()

    def _settle(self, op: int, failed: set[int]) -> None:
        report: Report = {op: frozenset(failed)}
        self._outbox.extend(self.planner.apply(report))
        nsave = self._saves.pop(op, None)
        if nsave is not None:
            self.saved_blocks += nsave - len(failed)
        load = self._loads.pop(op, None)
        if load is None:
            return
        n = load.match.num_blocks
        load.match.release()  # after apply: a block that failed its read is dropped now
        self.loaded_blocks += n - len(failed)
        self.failed_blocks += len(failed)
        st = self.reqs.get(load.req_id)
        if st is not None:
            if st.inflight_load == op:
                st.inflight_load = None
            if failed:
                # vLLM recomputes from the first failed block: save those blocks again.
                st.saved = min(st.saved, load.first_block + min(failed))

    # -- request end ---------------------------------------------------------------------
    def request_finished(self, request: Any) -> bool:
        """Drop the request's pending match and probe; True while an async load may write."""
        st = self.reqs.pop(request.request_id, None)
        if st is None:
            return False
        self._drop_match(st)
        self._end_probe(st)
        # vLLM still expects this request in finished_recving: keep its blocks until
        # then (vLLM frees them when it arrives, and asserts the request still exists).
        return st.awaiting_recv

    def on_finished_recving(self, req_ids: Iterable[str]) -> None:
        for r in req_ids:
            st = self.reqs.get(r)
            if st is not None:
                st.awaiting_recv = False

    # -- KV events -----------------------------------------------------------------------
    def _translate_events(self) -> None:
        """Turn the registries' events into vLLM's ``BlockStored``/``BlockRemoved``."""
        if self._sink is None or not self._sink.events:
            return
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        events, self._sink.events = self._sink.events, []
        # vLLM's media: GPU, CPU, and STORAGE for everything below host memory.
        vllm_media = {"GPU": "GPU", "CPU": "CPU"}
        medium = {ts.name: vllm_media.get(ts.medium, "STORAGE") for ts in self.tiers}
        for ev in events:
            if ev.kind is EventKind.REGISTERED:
                hashes, tokens = [], []
                for k in ev.hashes:
                    ext = self._ext.get(k)
                    if ext is None:
                        continue  # adopted or recovered: vLLM never hashed its tokens
                    ext[2] += 1
                    hashes.append(ext[0])
                    tokens.extend(ext[1])
                if hashes:
                    self._vllm_events.append(BlockStored(
                        block_hashes=hashes, parent_block_hash=None, token_ids=tokens,
                        block_size=self.page, lora_id=None, medium=medium[ev.tier],
                        lora_name=None))
            elif ev.kind in (EventKind.EVICTED, EventKind.REMOVED):
                gone = []
                for k in ev.hashes:
                    ext = self._ext.get(k)
                    if ext is None or ext[2] <= 0:
                        continue
                    gone.append(ext[0])
                    ext[2] -= 1
                    if ext[2] == 0:
                        del self._ext[k]
                if gone:
                    self._vllm_events.append(BlockRemoved(block_hashes=gone,
                                                          medium=medium[ev.tier]))
        # Blocks planned but never stored (a failed or refused save) are forgotten.
        if len(self._ext) > 4 * sum(ts.registry.capacity for ts in self.tiers):
            self._ext = {k: v for k, v in self._ext.items() if v[2] > 0}

    def take_events(self) -> list[Any]:
        self._translate_events()
        out, self._vllm_events = self._vllm_events, []
        return out

    def interval_stats(self) -> KvbmConnectorStats | None:
        """What changed since the last call, for vLLM's stats logger (None: nothing)."""
        now = {"loaded_blocks": self.loaded_blocks, "failed_loads": self.failed_blocks,
               "saved_blocks": self.saved_blocks, "not_saved_blocks": self.not_saved_blocks}
        delta = {k: v - self._reported.get(k, 0) for k, v in now.items()}
        self._reported = now
        out = KvbmConnectorStats(data={k: v for k, v in delta.items() if v})
        return None if out.is_empty() else out

    def stats(self) -> dict[str, Any]:
        return {
            "tiers": {ts.name: {"used_blocks": ts.registry.num_used, "hits": ts.hits,
                                "lookups": ts.lookups, "evictions": ts.registry.evictions,
                                "failed_slots": ts.registry.failed_slots}
                      for ts in self.tiers},
            "loaded_blocks": self.loaded_blocks,
            "failed_blocks": self.failed_blocks,
            "saved_blocks": self.saved_blocks,
            "not_saved_blocks": self.not_saved_blocks,
            "restored_blocks": self.restored_blocks,
            "adopted_blocks": self.adopted_blocks,
            "pending_ops": self.planner.num_pending + len(self._probes),
            "leaked_pins": self.planner.leaked_pins,
        }


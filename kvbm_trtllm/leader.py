"""The leader side of kvbm's TensorRT-LLM connector: TRT-LLM's scheduler calls over the planner.

The core ``Planner`` holds every registry, pin and slot decision; this module keeps
only what TRT-LLM's scheduling adds: each request's tokens, hashes, block table and
pending match, the loads and saves in flight, and the sums of the workers' reports.
A plan built here runs in every rank's worker (``kvbm_trtllm.worker``) on its own
shard; an operation is applied to the planner once all ``tp_size`` ranks reported
it, so a slot is committed only when every rank wrote it and a load's pins are
dropped only when every rank read it.

The planner is built once the workers registered their pools: the block layout is
TRT-LLM's pool's, which only the workers see (``WorkerHello`` through the link).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kvbm.chain import resolve_chain, tier_states
from kvbm.config import KvbmSettings
from kvbm.hashing import BlockHasher, SequenceHash
from kvbm.layout import BlockLayout
from kvbm.plan import Plan
from kvbm.planner import Match, Planner
from kvbm.plugins import build_plugins
from kvbm.ranks import Hashers, RankReports, restore_ranks

from ._interface import BAD_PAGE_INDEX
from ._link import Link
from .api import RequestData, SchedulerOutput
from .config import connector_settings
from .messages import KvbmTrtllmMetadata, WorkerHello, WorkerReport

log = logging.getLogger("kvbm.trtllm")

#: Hashers kept for (LoRA, cache salt) pairs; the least recently used goes first.
MAX_HASHERS = 64


@dataclass
class _Req:
    """What the leader knows of one request."""

    request_id: int
    supported: bool
    hasher: BlockHasher | None
    tokens: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    hashes: list[SequenceHash] = field(default_factory=list)
    match: Match | None = None  # matched, not yet turned into a load
    first_block: int = 0
    external: int = 0  # tokens promised at this allocation, until the next step's output
    saved: int = 0  # leading blocks already considered for saving

    def set_tokens(self, tokens: list[int]) -> None:
        """The request's tokens as TRT-LLM holds them (hashes stay valid for a prefix)."""
        if tokens[:len(self.tokens)] != self.tokens:
            self.hashes = []
        self.tokens = tokens

    def hashes_upto(self, n: int) -> list[SequenceHash]:
        """Sequence hashes of the first ``n`` complete blocks (computed once, extended)."""
        have = len(self.hashes)
        if n > have and self.hasher is not None:
            page = self.hasher.page_size
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.extend(self.hasher.hash_tokens(self.tokens[have * page:n * page],
                                                       parent=parent))
        return self.hashes[:n]


@dataclass
class _Load:
    request_id: int
    match: Match


class LeaderSide:
    """TensorRT-LLM's scheduler-side calls over one ``Planner`` (built once workers report)."""

    def __init__(self, user: KvbmSettings, tp_size: int, link: Link) -> None:
        self.user = user
        self.tp_size = tp_size
        self.link = link
        self.settings: KvbmSettings | None = None
        self.layout: BlockLayout | None = None
        self.planner: Planner | None = None
        #: Why reuse is off for this engine (a rank refused its pool), or None.
        self.disabled: str | None = None
        self.reqs: dict[int, _Req] = {}
        self._hashers: Hashers | None = None
        self._outbox = Plan()
        self._acc = RankReports(tp_size)
        self._loads: dict[int, _Load] = {}
        self._saves: dict[int, int] = {}  # save op -> blocks
        self._said: set[str] = set()
        self.restored_blocks = 0
        self.loaded_blocks = 0
        self.failed_blocks = 0
        self.saved_blocks = 0
        self.not_saved_blocks = 0

    @property
    def page(self) -> int:
        """Tokens per block (TRT-LLM's ``tokens_per_block``)."""
        assert self.layout is not None, "the layout is known once the workers said hello"
        return self.layout.page_size

    def _say_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(msg, *args)

    # -- start: the workers' layout and recovered blocks ---------------------------------
    def poll(self, timeout: float = 0.0) -> None:
        """Take what the workers sent: their hellos (once), then their reports."""
        if self.planner is None and self.disabled is None:
            hellos = self.link.hellos(timeout)
            if hellos is not None:
                self._start(hellos)
        if self.planner is not None:
            self.on_reports(self.link.take_reports())

    def _start(self, hellos: list[WorkerHello]) -> None:
        refused = [h.refused for h in hellos if h.refused]
        layouts = [h.layout for h in hellos if h.layout is not None]
        if refused or len(hellos) != self.tp_size or any(x != layouts[0] for x in layouts):
            self.disabled = refused[0] if refused else (
                f"{len(hellos)} of {self.tp_size} ranks registered, with layouts "
                f"{sorted({str(x) for x in layouts})}")
            log.error("kvbm: reuse is off for this engine: %s", self.disabled)
            return
        self.layout = layouts[0]
        self.settings = connector_settings(self.user, self.layout, self.tp_size)
        links = resolve_chain(self.settings, build_plugins())
        self.planner = Planner(tier_states(links), page_size=self.layout.page_size,
                               write_through=self.settings.write_through)
        self._hashers = Hashers(self.settings, self.layout)
        self.restored_blocks += restore_ranks(self.planner, self.tp_size,
                                              [h.blocks for h in hellos])

    # -- requests ------------------------------------------------------------------------
    def _hasher(self, lora: str | None, salt: str | None) -> BlockHasher:
        assert self._hashers is not None, "hashers are made when the workers registered"
        return self._hashers.get(lora, salt)

    def _state(self, request: Any) -> _Req:
        rid = int(request.request_id)
        st = self.reqs.get(rid)
        if st is None:
            supported = True
            if getattr(request, "multimodal_positions", None):
                supported = False
                self._say_once("mm", "kvbm: requests with multimodal inputs are passed through "
                               "without reuse (their KV depends on more than token ids)")
            lora_id = getattr(request, "lora_task_id", None)
            lora = f"lora-task-{lora_id}" if lora_id is not None else None
            salt = getattr(request, "cache_salt", None)
            hasher = self._hasher(lora, str(salt) if salt is not None else None) \
                if supported else None
            st = self.reqs[rid] = _Req(rid, supported, hasher)
        return st

    def _drop_match(self, st: _Req) -> None:
        if st.match is not None:
            st.match.release()
            st.match = None

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` kvbm holds (pinned now); loads are layer-wise."""
        self.poll()
        if self.planner is None:
            return 0, False
        st = self._state(request)
        self._drop_match(st)
        st.external = 0
        if not st.supported:
            return 0, False
        if num_computed_tokens % self.page:
            # TRT-LLM's partial reuse left part of a block computed: loading that block
            # would overwrite a page it may share. Said once; the request computes.
            self._say_once("partial", "kvbm: TensorRT-LLM reused part of a block "
                           "(kv_cache_config.enable_partial_reuse); such requests load nothing "
                           "from kvbm: set enable_partial_reuse: false")
            return 0, False
        st.set_tokens(list(request.get_tokens(0)))
        # Never the whole prompt: TRT-LLM must compute at least one token to sample from.
        usable = max(0, len(st.tokens) - 1) // self.page
        start = num_computed_tokens // self.page
        if usable <= start:
            return 0, False
        match = self.planner.match(st.hashes_upto(usable))
        n = match.num_blocks
        if n <= start:
            match.release()
            return 0, False
        # TRT-LLM already holds the first ``start`` blocks; only the rest is loaded.
        self.planner.trim(match, start, n)
        st.match = match
        st.first_block = start
        st.external = n * self.page - num_computed_tokens
        return st.external, False

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        """Turn the request's pinned match into a layer-wise load into the blocks allocated."""
        st = self.reqs.get(int(request.request_id))
        if st is None or st.match is None or self.planner is None:
            return
        match, st.match = st.match, None
        n = match.num_blocks
        engine = list(block_ids[st.first_block:st.first_block + n])
        assert len(engine) == n and all(b != BAD_PAGE_INDEX for b in engine), (
            f"TensorRT-LLM allocated blocks {list(block_ids)} for request {st.request_id}, which "
            f"do not cover the {n} blocks kvbm promised from block {st.first_block}")
        op = self.planner.plan_load(match, engine, promote=True, req_id=str(st.request_id),
                                    layerwise=True)
        self._outbox.loads.append(op)
        self._loads[op.op_id] = _Load(st.request_id, match)

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        """The engine consumes less than offered: keep only the blocks before ``start``."""
        st = self.reqs.get(int(request.request_id))
        if st is None or st.match is None:
            return
        keep = start // self.page - st.first_block
        if keep <= 0:
            self._drop_match(st)
            st.external = 0
        elif keep < st.match.num_blocks:
            assert self.planner is not None
            self.planner.trim(st.match, 0, keep)
            st.external = keep * self.page

    # -- the step's plan -----------------------------------------------------------------
    def build_meta(self, so: SchedulerOutput) -> KvbmTrtllmMetadata:
        """This step's plan: loads, saves of newly complete blocks, what reports led to."""
        self.poll()
        if self.planner is None:
            return KvbmTrtllmMetadata()
        keys: list[SequenceHash] = []
        engine: list[int] = []
        owners: list[str] = []
        for new, group in ((True, so.new_requests), (False, so.cached_requests)):
            for rd in group:
                self._collect(rd, new, keys, engine, owners)
        for st in self.reqs.values():
            st.external = 0  # TRT-LLM subtracts a promise in one step's output only
        if keys:
            res = self.planner.plan_save(keys, engine, owners=owners)
            self.not_saved_blocks += res.not_saved
            for op in res.plan.saves:
                self._saves[op.op_id] = len(op.slots)
            self._outbox.extend(res.plan)
        self._outbox.extend(self.planner.take_plan())
        plan, self._outbox = self._outbox, Plan()
        return KvbmTrtllmMetadata(plan)

    def _collect(self, rd: RequestData, new: bool, keys: list[SequenceHash], engine: list[int],
                 owners: list[str]) -> None:
        """The blocks of ``rd`` that are complete once this step ran, not saved before."""
        st = self.reqs.get(int(rd.request_id))
        if st is None or not st.supported:
            return  # never matched: its namespace (LoRA, salt) is not known here
        if new:
            st.set_tokens(list(rd.new_tokens))
            st.block_ids = list(rd.new_block_ids)
        else:
            st.set_tokens(st.tokens + list(rd.new_tokens))
            st.block_ids.extend(rd.new_block_ids)
        # computed_position leaves out the tokens promised since the last output (TRT-LLM
        # subtracts them once); their KV is valid once the loads ran, so they count here.
        valid = rd.computed_position + st.external + rd.num_scheduled_tokens
        # Draft tokens (speculative decoding) are not in ``tokens``: never a complete block.
        done = min(valid, len(st.tokens)) // self.page
        if done <= st.saved:
            return
        hashes = st.hashes_upto(done)
        i = st.saved
        while i < min(done, len(st.block_ids), len(hashes)):
            b = st.block_ids[i]
            if b == BAD_PAGE_INDEX:
                break  # a sliding window passed it: no page to read
            keys.append(hashes[i])
            engine.append(b)
            owners.append(str(st.request_id))
            i += 1
        st.saved = max(st.saved, i)

    # -- worker reports ------------------------------------------------------------------
    def on_reports(self, reports: list[WorkerReport]) -> None:
        """Add up the ranks' reports; apply each operation once every rank reported it."""
        assert self.planner is not None
        for w in reports:
            for op, failed in w.report.items():
                if not self.planner.is_pending(op):
                    continue  # settled already
                done = self._acc.add(op, 1, failed)
                if done is not None:
                    self._settle(op, done)

    def _settle(self, op: int, failed: set[int]) -> None:
        assert self.planner is not None
        self._outbox.extend(self.planner.apply({op: frozenset(failed)}))
        nsave = self._saves.pop(op, None)
        if nsave is not None:
            self.saved_blocks += nsave - len(failed)
        load = self._loads.pop(op, None)
        if load is not None:
            n = load.match.num_blocks
            load.match.release()  # after apply: a block that failed its read is dropped now
            self.loaded_blocks += n - len(failed)
            self.failed_blocks += len(failed)

    # -- request end ---------------------------------------------------------------------
    def request_finished(self, request: Any) -> bool:
        """Forget the request; False: kvbm's saves finished in the step (nothing async)."""
        self.poll()
        st = self.reqs.pop(int(request.request_id), None)
        if st is not None:
            self._drop_match(st)
        return False

    def stats(self) -> dict[str, Any]:
        """Counters of the leader and its tiers."""
        tiers = self.planner.tiers if self.planner is not None else []
        return {
            "tiers": {ts.name: {"used_blocks": ts.registry.num_used, "hits": ts.hits,
                                "lookups": ts.lookups, "evictions": ts.registry.evictions,
                                "failed_reads": ts.failed_reads} for ts in tiers},
            "loaded_blocks": self.loaded_blocks,
            "failed_blocks": self.failed_blocks,
            "saved_blocks": self.saved_blocks,
            "not_saved_blocks": self.not_saved_blocks,
            "restored_blocks": self.restored_blocks,
            "pending_ops": self.planner.num_pending if self.planner is not None else 0,
            "pins": self.planner.pins() if self.planner is not None else 0,
            "disabled": self.disabled,
        }


__all__ = ["LeaderSide"]

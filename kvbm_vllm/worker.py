"""The worker side of kvbm's vLLM connector: one rank's executor, driven by the step's plan.

Each tensor-parallel rank holds its own storage of every tier (``Tier.config_for_rank``
gives a per-rank directory or port where the config alone would name one) and runs
the same plan on its own shard of the KV heads, through the core ``Executor``:

- discards first (a slot a peer was served from leaves service before any write);
- layer-wise loads (blocks in the first tier) on the load thread, layer 0 of every
  block, then layer 1, …, while ``wait_for_layer`` blocks on one layer only, so
  attention of layer ``i`` overlaps the copy of layer ``i+1``;
- asynchronous loads (lower tiers, promoted into the first tier as they come),
  cascade copies and probes on I/O threads;
- saves layer by layer as vLLM computes them (``kvbm.layered.LayeredSave``).

Every operation is reported (``take_reports``) with the positions that failed; a
block whose load failed is also reported to vLLM (``take_load_errors``), which
recomputes it, and the saves of that request in the same step are not stored.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from kvbm.chain import build_tiers, resolve_chain
from kvbm.config import KvbmSettings
from kvbm.errors import LayoutError
from kvbm.executor import Executor
from kvbm.layered import LayeredSave
from kvbm.plan import LoadOp, Plan, ProbeOp, Report
from kvbm.plugins import build_plugins
from kvbm.ranks import namespace_for
from kvbm.served import SlotMap
from kvbm.tier import Tier

from .config import EngineLayout, physical_layout
from .metadata import KvbmConnectorMetadata, KvbmHandshakeMetadata, KvbmWorkerMetadata, as_reports

log = logging.getLogger("kvbm.vllm")


class WorkerSide:
    """The data half on one tensor-parallel rank: this rank's tiers and the copies."""

    def __init__(self, settings: KvbmSettings, eng: EngineLayout, rank: int,
                 probe_timeout_s: float = 5.0, vllm_config: Any = None) -> None:
        self.settings = settings
        self.eng = eng
        self.layout = eng.layout
        self.layer_names = eng.layer_names
        self.rank = rank
        self.probe_timeout_s = probe_timeout_s
        self.vllm_config = vllm_config
        self.plugins = build_plugins()
        self.links = resolve_chain(settings, self.plugins)
        # The storage is built once the engine's tensors are seen (register_kv_caches):
        # their physical layout is part of every stored block's identity.
        self._executor: Executor | None = None
        self.handshake: KvbmHandshakeMetadata | None = None
        self.refused: str | None = None
        self.engine: Any = None
        self._lock = threading.Lock()
        self._reports: Report = {}
        self._recving: set[str] = set()
        self._errors: set[int] = set()
        self._bad_reqs: set[str] = set()
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-load{rank}")
        self._events: list[threading.Event] | None = None
        self._sync: Future[None] | None = None
        self._save: LayeredSave | None = None

    @property
    def executor(self) -> Executor:
        """This rank's executor (built by ``register_kv_caches``)."""
        if self._executor is None:
            raise LayoutError("kvbm: no KV caches registered on this worker "
                              f"({self.refused or 'register_kv_caches was not called'})")
        return self._executor

    @property
    def tiers(self) -> list[Tier]:
        """This rank's storage of every tier, in chain order (none before registration)."""
        return self._executor.tiers if self._executor is not None else []

    @property
    def served(self) -> dict[int, SlotMap]:
        """Tier index -> the slot map peers are served from (a remote tier's ``serve``)."""
        return self._executor.served if self._executor is not None else {}

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of this rank's shard."""
        return self.layout.bytes_per_block

    # -- engine tensors ------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any], num_blocks: int | None = None) -> None:
        """Take vLLM's per-layer KV tensors, then build this rank's storage.

        A layout kvbm does not understand is refused with one line: the engine runs
        without reuse (the scheduler side learns it from the handshake), nothing is
        copied.
        """
        from kvbm.engine_blocks import engine_blocks

        missing = [n for n in self.layer_names if n not in kv_caches]
        ordered = kv_caches if missing else {n: kv_caches[n] for n in self.layer_names}
        try:
            if len(ordered) != self.layout.model.num_layers:
                raise LayoutError(f"expected {self.layout.model.num_layers} layers "
                                  f"{list(self.layer_names)}, got {list(kv_caches)}")
            engine = engine_blocks(ordered, self.layout, num_blocks=num_blocks,
                                   plugins=self.plugins,
                                   huge_pages=self.settings.engine_huge_pages)
            physical = (physical_layout(self.vllm_config, list(ordered), ordered)
                        if self.vllm_config is not None else "")
        except LayoutError as e:
            self.refused = str(e)
            log.error("kvbm rank %d: refusing vLLM's KV cache (%s); this engine runs without "
                      "kvbm's reuse", self.rank, e)
            self.handshake = KvbmHandshakeMetadata.of(self.rank, [], refused=self.refused)
            return
        self.engine = engine
        self.layout = replace(self.layout, physical=physical)
        self._build(physical)

    def _build(self, physical: str) -> None:
        ns = namespace_for(self.settings, self.layout, self.rank)
        tiers = build_tiers(self.links, ns, self.layout, rank=self.rank,
                            tp_size=self.settings.tp_size)
        ex = Executor(tiers, self.layout, copy_threads=self.settings.copy_threads,
                      io_threads=self.settings.io_threads, probe_timeout_s=self.probe_timeout_s,
                      name=f"kvbm{self.rank}",
                      background_yield_s=self.settings.background_yield_ms / 1e3)
        try:
            # Blocks persistent tiers (disk) hold from an earlier run of the same
            # layout. The scheduler side gets them through vLLM's handshake and
            # registers those that every rank holds in the same slot.
            recovered = ex.recover()
            ex.serve_peers()
        except BaseException:
            ex.close(timeout=0)
            raise
        self._executor = ex
        self.handshake = KvbmHandshakeMetadata.of(self.rank, recovered, physical=physical)

    # -- reports -------------------------------------------------------------------------
    def _report(self, report: Report) -> None:
        with self._lock:
            for op_id, failed in report.items():
                self._reports[op_id] = self._reports.get(op_id, frozenset()) | failed

    def take_reports(self) -> KvbmWorkerMetadata | None:
        with self._lock:
            reps, self._reports = self._reports, {}
        return KvbmWorkerMetadata(as_reports(reps)) if reps else None

    def take_finished_recving(self) -> set[str]:
        with self._lock:
            out, self._recving = self._recving, set()
        return out

    def take_load_errors(self) -> set[int]:
        with self._lock:
            out, self._errors = self._errors, set()
        return out

    # -- the step ------------------------------------------------------------------------
    def start(self, meta: KvbmConnectorMetadata) -> None:
        """Begin the step: discards, then loads and copies, and the saves' targets."""
        plan = meta.plan
        with self._lock:
            self._bad_reqs = set()  # before any load of this step can record a failure
        if self._executor is None:
            # No storage (refused or never registered): every operation fails, so the
            # scheduler aborts its slots and vLLM recomputes what it meant to load.
            self._finish_loads(plan.loads, plan.all_failed())
            self._report({op.op_id: frozenset({0}) for op in plan.probes})
            return
        for d in plan.discards:
            self.executor.discard(d)
        for c in plan.copies:
            self.executor.submit(self._copy, c)
        for p in plan.probes:
            self.executor.submit(self._probe, p)
        for op in plan.loads:
            if not op.layerwise:
                self.executor.submit(self._load, [op], None)
        sync = [op for op in plan.loads if op.layerwise]
        if sync:
            if self.engine is None:
                self._finish_loads(sync, Plan(loads=sync).all_failed())
            else:
                self._events = [threading.Event() for _ in range(self.engine.num_layers)]
                self._sync = self._load_pool.submit(self._load, sync, self._events)
        if plan.saves:
            if self.engine is None:
                log.error("kvbm rank %d: no KV caches registered (register_kv_caches not "
                          "called); this step's blocks are not stored", self.rank)
                self._report(Plan(saves=plan.saves).all_failed())
            else:
                self._save = LayeredSave(self.executor, plan.saves, self.engine)

    def _copy(self, op: Any) -> None:
        self._report({op.op_id: self.executor.copy(op)})

    def _probe(self, op: ProbeOp) -> None:
        """Report the index of the first key this rank's shared tier lacks (none: all found)."""
        n = self.executor.probe(op)
        self._report({op.op_id: frozenset() if n >= len(op.keys) else frozenset({n})})

    def _load(self, ops: list[LoadOp], events: list[threading.Event] | None) -> None:
        report: Report = {}
        try:
            on_layer = (lambda li: events[li].set()) if events is not None else None
            report = self.executor.load(ops, self.engine, on_layer=on_layer)
        except Exception as e:
            log.error("kvbm rank %d: load failed (%s); every block of it is a load error",
                      self.rank, e)
            report = Plan(loads=ops).all_failed()
        finally:
            if events is not None:
                for ev in events:
                    ev.set()
            self._finish_loads(ops, report)

    def _finish_loads(self, ops: list[LoadOp], report: Report) -> None:
        with self._lock:
            for op in ops:
                bad = report.get(op.op_id, frozenset())
                if bad:
                    self._bad_reqs.add(op.req_id)
                self._errors.update(op.dst[i] for i in bad)
                if not op.layerwise:
                    # Errors are recorded before the request is: vLLM must see a failed
                    # block no later than the step that reports the request done.
                    self._recving.add(op.req_id)
            for op_id, failed in report.items():
                self._reports[op_id] = self._reports.get(op_id, frozenset()) | failed

    def wait_for_layer(self, layer_name: str) -> None:
        """Block until this step's loads have written layer ``layer_name``."""
        events = self._events
        if events is None or self.engine is None:
            return
        try:
            li = self.engine.layer_index(layer_name)
        except LayoutError:
            return
        events[li].wait()

    def save_layer(self, layer_name: str) -> None:
        """Copy one layer of this step's newly complete blocks into their tier."""
        if self._save is None:
            return
        try:
            li = self.engine.layer_index(layer_name)
        except LayoutError:
            return
        self._save.layer(li)

    def finish_step(self) -> None:
        """End of the step: wait for layer-wise loads, finish and report the saves."""
        if self._sync is not None:
            self._sync.result()
            self._sync = None
            self._events = None
        save, self._save = self._save, None
        if save is not None:
            with self._lock:
                bad = set(self._bad_reqs)
            self._report(save.finish(bad))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every background load, copy and probe (tests, shutdown)."""
        return self._executor.flush(timeout) if self._executor is not None else True

    def close(self) -> None:
        self._load_pool.shutdown(wait=True)
        if self._save is not None:
            self._save.close()
        if self._executor is not None:
            self._executor.close(timeout=0)

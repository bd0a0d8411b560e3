"""The worker side of kvbm's TensorRT-LLM connector: one rank's executor, driven by the plan.

Each tensor-parallel rank holds its own storage of every tier (``Tier.config_for_rank``
gives a per-rank directory or port) and runs the step's plan on its shard of the KV
heads, through the core ``Executor``:

- discards first, then cascade copies on I/O threads;
- loads layer by layer on the load thread (every block's layer 0, then layer 1, …),
  while ``wait_for_layer(i)`` waits for layer ``i`` only, so attention of layer ``i``
  overlaps the copy of layer ``i + 1``;
- saves layer by layer as TRT-LLM computes them (``kvbm.layered.LayeredSave``).

Every operation is reported with the positions that failed; the reports reach the
leader through ``kvbm_trtllm._link``. A load that failed is also raised, at the end
of the forward pass (``finish_step``), as ``KvbmLoadError``: TRT-LLM's connector API
has no way to hand a promised block back for recomputation (vLLM's
``get_block_ids_with_load_errors`` has no counterpart), so the step's requests fail
rather than run on KV that never arrived, the blocks those requests computed in the
step are not stored, and the leader drops the unreadable blocks, so a retry of the
prompt computes them again.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kvbm.chain import build_tiers, resolve_chain
from kvbm.config import KvbmSettings
from kvbm.errors import ConfigError, KvbmError, LayoutError
from kvbm.executor import Executor
from kvbm.hashing import SequenceHash
from kvbm.layered import LayeredSave
from kvbm.plan import CopyOp, LoadOp, Plan, Report
from kvbm.plugins import build_plugins
from kvbm.ranks import namespace_for
from kvbm.tier import Tier

from ._link import Collective, Link
from .config import PoolLayout, connector_settings, pool_layout
from .messages import WorkerHello, WorkerReport

log = logging.getLogger("kvbm.trtllm")


class KvbmLoadError(KvbmError):
    """Blocks kvbm promised TensorRT-LLM could not be read; the step must not use them."""

    def __init__(self, failed: dict[str, list[int]]) -> None:
        self.failed = failed
        blocks = sum(len(v) for v in failed.values())
        detail = "; ".join(f"request {r}: engine blocks {sorted(b)}"
                           for r, b in sorted(failed.items()))
        super().__init__(
            f"kvbm: {blocks} KV block(s) promised to TensorRT-LLM failed to load ({detail}). "
            "TensorRT-LLM's connector API cannot recompute a promised prefix, so this step's "
            "requests fail instead of running on missing KV; kvbm dropped the unreadable "
            "blocks, so a retry of the prompt computes them")


class WorkerSide:
    """The data half on one tensor-parallel rank: this rank's tiers and the copies."""

    def __init__(self, user: KvbmSettings, llm_args: Any, rank: int, tp_size: int,
                 collective: Collective, link: Link | None) -> None:
        self.user = user
        self.llm_args = llm_args
        self.rank = rank
        self.tp_size = tp_size
        self.collective = collective
        self.link = link  # rank 0 only: where the leader reads what was gathered
        self.plugins = build_plugins()
        self.pool: PoolLayout | None = None
        self.settings: KvbmSettings | None = None
        self.engine: Any = None
        self.refused: str | None = None
        self._executor: Executor | None = None
        self._lock = threading.Lock()
        self._report: Report = {}
        self._errors: dict[str, set[int]] = {}  # request -> engine blocks that failed
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-trtllm-load{rank}")
        self._events: list[threading.Event] | None = None
        self._sync: Future[None] | None = None
        self._save: LayeredSave | None = None
        self._step_loads = False  # this step's plan had loads: the same on every rank

    @property
    def executor(self) -> Executor:
        """This rank's executor (built by ``register``)."""
        if self._executor is None:
            raise LayoutError("kvbm: no KV-cache pool registered on this worker "
                              f"({self.refused or 'register_kv_caches was not called'})")
        return self._executor

    @property
    def tiers(self) -> list[Tier]:
        """This rank's storage of every tier, in chain order (none before registration)."""
        return self._executor.tiers if self._executor is not None else []

    # -- start ---------------------------------------------------------------------------
    def register(self, pool: Any) -> None:
        """Read TRT-LLM's pool, build this rank's storage, tell the leader (collective).

        A pool kvbm cannot read is refused with one line and the engine runs without
        reuse; a configuration error is raised on every rank alike, after the gather,
        so no rank is left waiting in it.
        """
        hello = WorkerHello(self.rank)
        try:
            self.pool = pool_layout(pool, self.llm_args, self.user)
            self.settings = connector_settings(self.user, self.pool.layout, self.tp_size)
            from kvbm.engine_blocks import engine_blocks

            self.engine = engine_blocks(pool, self.pool.layout, kv_layout=self.pool.kv_layout,
                                        plugins=self.plugins)
            hello.recovered = WorkerHello.encode(self._build(self.settings))
            hello.layout = self.pool.layout
        except LayoutError as e:
            self.refused = hello.refused = str(e)
            self.engine = None
            log.error("kvbm rank %d: refusing TensorRT-LLM's KV-cache pool (%s); this engine "
                      "runs without kvbm's reuse", self.rank, e)
        except Exception as e:
            hello.error = f"{type(e).__name__}: {e}" if not isinstance(e, ConfigError) else str(e)
        hellos: list[WorkerHello] = self.collective.allgather(hello)
        bad = next((h for h in hellos if h.error), None)
        if bad is not None:
            self.close()
            raise ConfigError(f"kvbm rank {bad.rank}: {bad.error}")
        if self.link is not None:
            self.link.post_hellos(hellos)

    def _build(self, settings: KvbmSettings) -> list[list[tuple[int, SequenceHash]]]:
        assert self.pool is not None, "the pool's layout comes first"
        layout = self.pool.layout
        links = resolve_chain(settings, self.plugins)
        tiers = build_tiers(links, namespace_for(settings, layout, self.rank), layout,
                            rank=self.rank, tp_size=self.tp_size)
        ex = Executor(tiers, layout, copy_threads=settings.copy_threads,
                      io_threads=settings.io_threads, name=f"kvbm-trtllm{self.rank}")
        try:
            # Blocks persistent tiers (disk) hold from an earlier run of this layout; the
            # leader registers those every rank holds in the same slot.
            recovered = ex.recover()
            ex.serve_peers()
        except BaseException:
            ex.close(timeout=0)
            raise
        self._executor = ex
        return recovered

    # -- the step ------------------------------------------------------------------------
    def start(self, plan: Plan) -> None:
        """Begin the step: discards, cascade copies, layer-wise loads, the saves' targets."""
        self._abandon()
        self._step_loads = bool(plan.loads)
        if self._executor is None or self.engine is None:
            # No storage (refused): every operation fails, so the leader aborts its slots.
            self._fail_all(plan)
            return
        for d in plan.discards:
            self.executor.discard(d)
        for c in plan.copies:
            self.executor.submit(self._copy, c)
        if plan.loads:
            self._events = [threading.Event() for _ in range(self.engine.num_layers)]
            self._sync = self._load_pool.submit(self._load, list(plan.loads), self._events)
        if plan.saves:
            self._save = LayeredSave(self.executor, plan.saves, self.engine)

    def _fail_all(self, plan: Plan) -> None:
        for ld in plan.loads:
            with self._lock:
                self._errors.setdefault(ld.req_id, set()).update(ld.dst)
        self._add(plan.all_failed())

    def _abandon(self) -> None:
        """A step whose forward pass never reached ``wait_for_save`` (it raised): wait for
        its loads, and store none of its saves, whose layers may be half computed."""
        if self._sync is not None:
            self._sync.result()
        save, self._save = self._save, None
        if save is not None:
            self._add(Plan(saves=save.ops).all_failed())
            save.close()
        self._sync, self._events = None, None
        with self._lock:
            self._errors = {}

    def _add(self, report: Report) -> None:
        with self._lock:
            for op_id, failed in report.items():
                self._report[op_id] = self._report.get(op_id, frozenset()) | failed

    def _copy(self, op: CopyOp) -> None:
        self._add({op.op_id: self.executor.copy(op)})

    def _load(self, ops: list[LoadOp], events: list[threading.Event]) -> None:
        report: Report = {}
        try:
            report = self.executor.load(ops, self.engine, on_layer=lambda li: events[li].set())
        except Exception as e:
            log.error("kvbm rank %d: load failed (%s); every block of it failed", self.rank, e)
            report = Plan(loads=ops).all_failed()
        finally:
            for ev in events:
                ev.set()
            with self._lock:
                for op in ops:
                    bad = report.get(op.op_id, frozenset())
                    if bad:
                        self._errors.setdefault(op.req_id, set()).update(op.dst[i] for i in bad)
            self._add(report)

    def wait_for_layer(self, layer: int) -> None:
        """Block until this step's loads have written layer ``layer``."""
        events = self._events
        if events is not None and 0 <= layer < len(events):
            events[layer].wait()

    def save_layer(self, layer: int) -> None:
        """Copy layer ``layer`` of this step's newly complete blocks into their tier."""
        engine = self.engine
        if self._save is not None and engine is not None and 0 <= layer < engine.num_layers:
            self._save.layer(layer)

    def finish_step(self) -> None:
        """End of the forward pass: finish loads and saves; raise if a load failed.

        Every rank learns every rank's failed loads (a collective when the step loaded
        anything, which every rank knows from the same plan), so all ranks fail the
        step together and none runs ahead of the others.
        """
        loaded, self._step_loads = self._step_loads, False
        if self._sync is not None:
            self._sync.result()
        self._sync, self._events = None, None
        with self._lock:
            mine = {r: sorted(b) for r, b in self._errors.items() if b}
            self._errors = {}
        save, self._save = self._save, None
        if save is not None:
            # Blocks a request computed on top of a failed load are never stored.
            self._add(save.finish(set(mine)))
        if not loaded:
            return
        failed: dict[str, set[int]] = {}
        for theirs in self.collective.allgather(mine):
            for r, b in theirs.items():
                failed.setdefault(r, set()).update(b)
        if failed:
            raise KvbmLoadError({r: sorted(b) for r, b in failed.items()})

    # -- reports -------------------------------------------------------------------------
    def report(self) -> None:
        """Gather every rank's finished operations; rank 0 posts them for the leader."""
        with self._lock:
            mine, self._report = self._report, {}
        everyone: list[WorkerReport] = self.collective.allgather(WorkerReport(self.rank, mine))
        if self.link is not None and any(w.report for w in everyone):
            self.link.post_reports(everyone)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every background copy (tests, shutdown)."""
        return self._executor.flush(timeout) if self._executor is not None else True

    def close(self) -> None:
        """Finish the load thread and close this rank's tiers."""
        self._load_pool.shutdown(wait=True)
        if self._save is not None:
            self._save.close()
            self._save = None
        if self._executor is not None:
            self._executor.close(timeout=0)
            self._executor = None


__all__ = ["KvbmLoadError", "WorkerSide"]

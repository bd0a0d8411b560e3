"""Saves an engine fills layer by layer: the executor's ``save`` spread over a forward pass.

An engine that computes KV one layer at a time (vLLM's ``save_kv_layer``) hands each
layer over as soon as it is written: ``LayeredSave.layer(i)`` copies layer ``i`` of
every block of the step's ``SaveOp``s into their target (a memory tier's slot
views, or staging buffers for a tier that stores through ``write``), and
``finish`` copies the layers it was not given, writes the staged blocks, serves the
written slots to peers and reports. The target slots are claimed from peers at the
start, before any layer lands in them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .executor import Executor
from .hashing import SequenceHash
from .plan import Report, SaveOp


class LayeredSave:
    """One step's saves, filled layer by layer from an engine adapter."""

    def __init__(self, executor: Executor, ops: Sequence[SaveOp], engine: Any) -> None:
        self.ex = executor
        self.ops = list(ops)
        self.engine = engine
        self._t0 = time.perf_counter()
        # Positions a peer's lease holds: never written this step, reported failed.
        self._refused = [executor._claim(op.tier, op.slots) for op in self.ops]
        self._bufs: list[list[np.ndarray]] = []
        self._staged: list[bool] = []
        for op in self.ops:
            views = executor.tiers[op.tier].views(op.slots)
            if views is None:
                self._bufs.append(executor.staging.acquire(len(op.slots)))
                self._staged.append(True)
            else:
                self._bufs.append(list(views))
                self._staged.append(False)
        self._done: set[int] = set()
        self._errors: list[set[int]] = [set() for _ in self.ops]

    def layer(self, li: int) -> None:
        """Copy layer ``li`` of every block of the step into its target (once)."""
        if li in self._done:
            return
        self._done.add(li)
        for k, (op, bufs, skip) in enumerate(zip(self.ops, self._bufs, self._refused)):
            todo = [i for i in range(len(op.slots)) if i not in skip and i not in self._errors[k]]
            if not todo:
                continue
            try:
                self.engine.copy_layer_out(li, [op.src[i] for i in todo], [bufs[i] for i in todo])
            except Exception as e:  # a bad block id fails that op, not the step
                self.ex.warn("layered-save", "kvbm: saving layer %d of op %d failed (%s)",
                             li, op.op_id, e)
                self._errors[k].update(todo)

    def finish(self, bad_owners: Iterable[str] = ()) -> Report:
        """Copy the layers not handed over, write staged blocks, report every op.

        Blocks owned by a request in ``bad_owners`` (its load failed this step, so its
        KV was computed on top of missing bytes) are never stored.
        """
        bad = set(bad_owners)
        report: Report = {}
        try:
            for li in range(int(getattr(self.engine, "num_layers", 0))):
                self.layer(li)
            sync = getattr(self.engine, "synchronize", None)
            if callable(sync):
                sync()
            for k, (op, bufs, staged) in enumerate(zip(self.ops, self._bufs, self._staged)):
                failed = set(self._refused[k]) | self._errors[k]
                if bad and op.owners:
                    failed |= {i for i, r in enumerate(op.owners) if r in bad}
                todo = [i for i in range(len(op.slots)) if i not in failed]
                if staged and todo:
                    ok = self.ex._write(op.tier, [op.slots[i] for i in todo],
                                        [SequenceHash(op.keys[i]) for i in todo],
                                        [bufs[i] for i in todo])
                    failed |= {i for i, g in zip(todo, ok) if not g}
                self.ex._commit(op.tier, op.slots, op.keys, failed)
                report[op.op_id] = frozenset(failed)
                self.ex.count(f"offload:{self.ex.tiers[op.tier].name}",
                              len(op.slots) - len(failed), time.perf_counter() - self._t0,
                              len(failed))
        except Exception as e:
            self.ex.warn("layered-save", "kvbm: save failed (%s); its blocks are not stored", e)
            for op in self.ops:
                report[op.op_id] = frozenset(range(len(op.slots)))
        finally:
            self.close()
        return report

    def close(self) -> None:
        """Give the staging buffers back (idempotent)."""
        for bufs, staged in zip(self._bufs, self._staged):
            if staged:
                self.ex.staging.release(bufs)
        self._bufs = []
        self._staged = []

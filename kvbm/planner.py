"""The planner: the metadata half of the data path, written once for every caller.

It holds one ``BlockRegistry`` per tier, the pins, the admission filters and every
slot decision, and turns "match this prefix", "save these blocks" and "load these
blocks" into a ``Plan`` of slot-level operations (``kvbm.plan``). It does no I/O and
starts no thread: an executor runs the plan (in this process, or in every vLLM
worker on its own shard) and reports which positions failed; ``apply`` turns the
report into commits, aborts, unpins and the next operations (the write-through
cascade). A slot leaves ``WRITING`` only through ``apply``: committed when its copy
succeeded everywhere, returned to the free list (to its bottom) when it failed.

Thread-safe: every public method takes the planner's lock. Events produced by the
registries are published after the lock is released.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, cast

from ._allocate_native import _alloc_fn, allocate_run
from ._registry_native import all_keys, unpin_run
from .chain import TierState
from .errors import KvbmError
from .events import BlockEvent, EventBus, EventKind
from .hashing import SequenceHash
from .match import Match, Pin
from .plan import CopyOp, DiscardOp, LoadOp, Plan, ProbeOp, Report, SaveOp
from .policy import AdmitAll

log = logging.getLogger("kvbm")

__all__ = ["Match", "Planner", "SaveResult", "TierState"]


@dataclass(slots=True)
class SaveResult:
    """What ``plan_save`` decided: the plan to run and the blocks it will not write."""

    plan: Plan
    present: int = 0  # already held by the first tier (or the tier that took it)
    rejected: int = 0  # refused by the first tier's admission filter
    not_saved: int = 0  # no tier had a free slot
    overflow: int = 0  # written to a lower tier because the tiers above were full


@dataclass(slots=True)
class _Pending:
    """What one reported operation reserved, so that ``apply`` can settle it."""

    kind: str  # "write" (save, copy, promote) or "load"
    tier: int
    slots: list[int]
    keys: list[SequenceHash]
    prios: list[int] = field(default_factory=list)
    src_tier: int = -1  # copy: the source tier, whose slots are pinned until it ends
    src_slots: list[int] = field(default_factory=list)
    cascade: bool = True
    tiers: list[int] = field(default_factory=list)  # load: the tier of each block


class Planner:
    """Registries, pins, admission and slot choice for one chain; plans, never I/O."""

    def __init__(self, tiers: list[TierState], *, page_size: int, write_through: bool = True,
                 events: EventBus | None = None, bypass_refused: bool = True) -> None:
        self.tiers = tiers
        self.page_size = page_size
        self.write_through = write_through and len(tiers) > 1
        #: In the write-through cascade, a block a tier's admission filter refuses is
        #: offered to the tier below it, copied from the tier above (which still holds
        #: it); otherwise a refusal ends the block's cascade there.
        self.bypass_refused = bypass_refused
        self.events = events
        self.lock = threading.RLock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._discards: list[DiscardOp] = []
        self._leaked: deque[list[Pin]] = deque()
        self.leaked_pins = 0
        self.not_saved = 0
        _alloc_fn()  # compile the batch allocation now (0.1-0.3 s), not in the first offload

    # -- helpers -------------------------------------------------------------------------
    def _next_id(self) -> int:
        return next(self._ids)

    def _leak(self, pins: list[Pin]) -> None:
        # Called by a Match's finalizer, possibly inside another planner call on this
        # thread: only queue the pins here; the next call under the lock drops them.
        if pins:
            self._leaked.append(pins)

    def _enter(self) -> None:
        """Start of every locked call: drop the pins of matches that were never released."""
        while self._leaked:
            pins = self._leaked.popleft()
            self.leaked_pins += len(pins)
            log.warning("kvbm: a Match of %d blocks was dropped without release(); its pins "
                        "are released now (use `with manager.match_prefix(...)`)", len(pins))
            self._unpin(pins)

    def _unpin(self, pins: Sequence[Pin]) -> None:
        """Unpin each tier's slots in order (one batch call a tier), then collect its drops."""
        if not pins:
            return
        ts, ss = zip(*pins)
        for t in sorted(set(ts)):
            unpin_run(self.tiers[t].registry,
                      list(ss) if ts.count(t) == len(ts) else [s for u, s in pins if u == t])
            self._collect_evicted(t)

    def _collect_evicted(self, t: int) -> None:
        evicted = self.tiers[t].registry.take_dropped()
        if evicted:
            self._discards.append(DiscardOp(t, [s for _, s in evicted], [k for k, _ in evicted]))

    def _take_events(self) -> list[BlockEvent]:
        if self.events is None or not self.events.active:
            return []
        out: list[BlockEvent] = []
        for ts in self.tiers:
            out.extend(ts.registry.take_events())
        return out

    def _publish(self, events: list[BlockEvent]) -> None:
        if events and self.events is not None:
            self.events.publish(events)

    def _with_discards(self, plan: Plan) -> Plan:
        if self._discards:
            plan.discards.extend(self._discards)
            self._discards = []
        return plan

    def take_plan(self) -> Plan:
        """Operations that arose outside a planning call (discards after a release)."""
        with self.lock:
            self._enter()
            return self._with_discards(Plan())

    def is_pending(self, op_id: int) -> bool:
        """Whether ``op_id`` still waits for its report."""
        with self.lock:
            return op_id in self._pending

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # -- match ---------------------------------------------------------------------------
    def match(self, hashes: Sequence[SequenceHash]) -> Match:
        """Pin the longest prefix of ``hashes`` the chain holds; stop at the first miss."""
        m = Match(self, self.page_size)
        with self.lock:
            self._enter()
            self._extend(m, hashes)
            events = self._take_events()
        if self.events is not None and self.events.active and m.hashes:
            events.extend(self._matched_events(m))
        self._publish(events)
        return m

    def _extend(self, m: Match, hashes: Sequence[SequenceHash]) -> None:
        if self.tiers:
            # The first tier's run in one call (its lookups overlap in memory), then
            # block by block from its first miss on, as before.
            ts = self.tiers[0]
            slots = ts.registry.pin_run(hashes)
            if slots:
                k = len(slots)
                ts.lookups += k
                ts.hits += k
                m.hashes.extend(hashes[:k])
                m.tiers.extend([ts.name] * k)
                m._pins.extend(zip(repeat(ts.index), slots))
                hashes = hashes[k:]
        for h in hashes:
            for ts in self.tiers:
                ts.lookups += 1
                slot = ts.registry.pin(h)
                if slot is not None:
                    ts.hits += 1
                    m.hashes.append(h)
                    m.tiers.append(ts.name)
                    m._pins.append((ts.index, slot))
                    break
            else:
                return

    def _matched_events(self, m: Match) -> list[BlockEvent]:
        now = time.time()
        by_tier: dict[str, list[SequenceHash]] = {}
        for h, t in zip(m.hashes, m.tiers):
            by_tier.setdefault(t, []).append(h)
        return [BlockEvent(EventKind.MATCHED, t, tuple(hs), now) for t, hs in by_tier.items()]

    def release(self, m: Match) -> None:
        """Drop a match's pins (``Match.release`` calls this)."""
        with self.lock:
            self._enter()
            pins, m._pins[:] = list(m._pins), []
            self._unpin(pins)
            events = self._take_events()
        self._publish(events)

    def trim(self, m: Match, start: int, end: int) -> None:
        """Keep blocks ``start`` to ``end`` of a match; unpin the others."""
        self.check(m)
        with self.lock:
            self._enter()
            drop = m._pins[:start] + m._pins[end:]
            m._pins[:] = m._pins[start:end]
            m.hashes[:] = m.hashes[start:end]
            m.tiers[:] = m.tiers[start:end]
            self._unpin(drop)
            events = self._take_events()
        self._publish(events)

    def check(self, m: Match) -> None:
        """Raise unless ``m`` is a live match of this planner."""
        if m._owner is not None and m._owner._planner is None:
            raise KvbmError("this part of a Match outlived the match it came from; onboard "
                            "parts before releasing the whole match")
        if m._planner is not self:
            if m._planner is None:
                raise KvbmError("this Match was released; match the prefix again before "
                                "onboarding it")
            raise KvbmError("this Match belongs to another manager (another chain); onboard "
                            "it with the manager whose match_prefix made it")

    # -- blocks other instances wrote in shared tiers ----------------------------------------
    def probe_ops(self, keys: Sequence[SequenceHash]) -> list[ProbeOp]:
        """One probe per shared tier for ``keys`` (the blocks the registries lack)."""
        raw = [bytes(k) for k in keys]
        return [ProbeOp(self._next_id(), ts.index, raw) for ts in self.tiers if ts.shared]

    def adopt(self, keys: Sequence[SequenceHash], found: dict[int, int],
              into: Match | None = None) -> int:
        """Register the leading ``found[t]`` of ``keys`` that shared tier ``t`` holds.

        The tier with the longest found prefix wins (chain order breaks ties). With
        ``into`` (a match that ends where ``keys`` start) the adopted blocks are pinned
        onto it. Returns the number adopted.
        """
        best = max(found.items(), key=lambda kv: (kv[1], -kv[0]), default=(0, 0))
        t, n = best
        if n <= 0:
            return 0
        with self.lock:
            self._enter()
            ts = self.tiers[t]
            reg = ts.registry
            done = 0
            for k in keys[:n]:
                slot = reg.allocate(k)
                if slot is None:
                    slot = reg.pin(k) if into is not None else reg.lookup(k)
                    if slot is None:
                        break  # being written, or no slot free: stop the prefix here
                else:
                    reg.commit(slot, pinned=into is not None)
                    ts.adopted += 1
                done += 1
                if into is not None:
                    ts.hits += 1
                    into.hashes.append(k)
                    into.tiers.append(ts.name)
                    into._pins.append((t, slot))
            self._collect_evicted(t)
            events = self._take_events()
        self._publish(events)
        return done

    # -- save ----------------------------------------------------------------------------
    def plan_save(self, hashes: Sequence[SequenceHash], src: Sequence[int],
                  priorities: Sequence[int] | None = None,
                  owners: Sequence[str] | None = None) -> SaveResult:
        """Plan writing engine blocks ``src[i]`` as ``hashes[i]`` into the first tier.

        Blocks the first tier holds already are not written again; they are offered
        to the next tier (a repeat offer is what lets a frequency filter there admit
        a reused block). A block the first tier cannot take because every slot is
        pinned or being written goes straight to the next tier that can (and counts
        as ``overflow``); one that no tier can take counts as ``not_saved``.
        """
        prios = list(priorities) if priorities is not None else [0] * len(hashes)
        res = SaveResult(Plan())
        if not hashes or not self.tiers:
            return res
        with self.lock:
            self._enter()
            top = self.tiers[0]
            reg = top.registry
            if not self.write_through and type(top.admission) is AdmitAll:
                # One tier that takes every block: no pass over the batch first, the
                # allocation answers which blocks it holds already.
                self._place(0, list(range(len(hashes))), hashes, src, prios, owners, res,
                            held_unknown=True)
                absent = []
            else:
                absent = [i for i, h in enumerate(hashes) if h not in reg]
                res.present = len(hashes) - len(absent)
            if res.present and self.write_through:
                held = set(absent)
                self._reoffer([i for i in range(len(hashes)) if i not in held], hashes, prios,
                              res.plan)
            if absent:
                admit = self._admit(top, [hashes[i] for i in absent], [prios[i] for i in absent])
                taken = [i for i, a in zip(absent, admit) if a]
                res.rejected = len(absent) - len(taken)
                top.rejected += res.rejected
                self._place(0, taken, hashes, src, prios, owners, res)
            events = self._take_events()
            self._with_discards(res.plan)
        self._publish(events)
        return res

    def _admit(self, ts: TierState, keys: list[SequenceHash], prios: list[int]) -> list[bool]:
        try:
            got = list(ts.admission.admit(keys, prios))
            if len(got) != len(keys):
                raise ValueError(f"returned {len(got)} answers for {len(keys)} blocks")
            return got
        except Exception as e:
            ts.warn("admission filter failed (%s); admitting nothing", e)
            return [False] * len(keys)

    def _place(self, t: int, idx: list[int], hashes: Sequence[SequenceHash], src: Sequence[int],
               prios: list[int], owners: Sequence[str] | None, res: SaveResult,
               held_unknown: bool = False) -> None:
        """Reserve slots in tier ``t`` for blocks ``idx``; overflow the rest downwards.

        ``held_unknown``: ``idx`` may name blocks the tier holds already (counted as
        ``present``), else every one is absent."""
        ts = self.tiers[t]
        reg = ts.registry
        n = len(hashes)
        # ``idx`` ascends without repeats, so a whole batch is ``range(n)`` in order.
        keys = list(hashes) if len(idx) == n else [hashes[i] for i in idx]
        got = allocate_run(reg, keys)
        full: list[int] = []
        if None not in got:  # every block got a slot (the common case): no pass per block
            slots = cast(list[int], got)
            took = idx
        else:
            slots, took = [], []
            kept: list[SequenceHash] = []
            for i, k, slot in zip(idx, keys, got):
                if slot is None:
                    if held_unknown and k in reg:
                        res.present += 1
                        continue
                    full.append(i)
                else:
                    slots.append(slot)
                    took.append(i)
                    kept.append(k)
            keys = kept
        self._collect_evicted(t)
        if took:
            whole = len(took) == n  # then ``took`` is ``range(n)``
            op = SaveOp(self._next_id(), t, slots, list(map(bytes, keys)),
                        list(src) if whole else [src[i] for i in took],
                        ([] if owners is None else list(owners) if whole
                         else [owners[i] for i in took]))
            self._pending[op.op_id] = _Pending("write", t, slots, keys,
                                               prios if whole else [prios[i] for i in took])
            res.plan.saves.append(op)
            if t > 0:
                ts.overflow_in += len(took)
                res.overflow += len(took)
        if not full:
            return
        ts.skipped += len(full)
        if t + 1 >= len(self.tiers):
            res.not_saved += len(full)
            self.not_saved += len(full)
            ts.warn("%d block(s) not saved: every slot of the chain is pinned or being "
                    "written (raise the capacity, or release matches sooner)", len(full))
            return
        nxt = self.tiers[t + 1]
        absent = [i for i in full if hashes[i] not in nxt.registry]
        res.present += len(full) - len(absent)
        if absent:
            admit = self._admit(nxt, [hashes[i] for i in absent], [prios[i] for i in absent])
            refused = len(absent) - sum(admit)
            if refused:
                res.not_saved += refused
                self.not_saved += refused
                nxt.rejected += refused
            self._place(t + 1, [i for i, a in zip(absent, admit) if a], hashes, src, prios,
                        owners, res)

    def _reoffer(self, idx: list[int], hashes: Sequence[SequenceHash], prios: list[int],
                 plan: Plan) -> None:
        """Offer blocks the first tier holds to the second again (pinned while copied)."""
        nxt = self.tiers[1].registry
        top = self.tiers[0].registry
        keys: list[SequenceHash] = []
        slots: list[int] = []
        ps: list[int] = []
        for i in idx:
            h = hashes[i]
            if h in nxt:
                continue
            slot = top.pin(h)
            if slot is None:
                continue  # still being written: its own cascade offers it
            keys.append(h)
            slots.append(slot)
            ps.append(prios[i])
        if keys:
            self._plan_copy(0, keys, slots, ps, plan)

    def _plan_copy(self, src: int, keys: list[SequenceHash], slots: list[int], prios: list[int],
                   plan: Plan, dst: int | None = None) -> None:
        """Reserve tier ``dst`` (default ``src + 1``) slots for blocks pinned in ``src``;
        unpin what is not copied. With ``bypass_refused``, blocks ``dst``'s filter refuses
        are offered to the tier below ``dst`` instead, still from ``src``."""
        if dst is None:
            dst = src + 1
        ds = self.tiers[dst]
        sreg = self.tiers[src].registry
        absent = [i for i, k in enumerate(keys) if k not in ds.registry]
        admit = self._admit(ds, [keys[i] for i in absent], [prios[i] for i in absent])
        ds.rejected += len(absent) - sum(admit)
        go = {i for i, a in zip(absent, admit) if a}
        down = self.bypass_refused and dst + 1 < len(self.tiers)
        refused = {i for i, a in zip(absent, admit) if not a} if down else set()
        b_keys: list[SequenceHash] = []
        b_src: list[int] = []
        b_prio: list[int] = []
        c_keys: list[SequenceHash] = []
        c_src: list[int] = []
        c_dst: list[int] = []
        c_prio: list[int] = []
        for i, (k, s) in enumerate(zip(keys, slots)):
            d = ds.registry.allocate(k) if i in go else None
            if d is None:
                if i in go:
                    ds.skipped += 1
                elif i in refused:  # still pinned in ``src``: offered one tier further down
                    b_keys.append(k)
                    b_src.append(s)
                    b_prio.append(prios[i])
                    continue
                sreg.unpin(s)
                continue
            c_keys.append(k)
            c_src.append(s)
            c_dst.append(d)
            c_prio.append(prios[i])
        self._collect_evicted(src)
        self._collect_evicted(dst)
        if c_keys:
            op = CopyOp(self._next_id(), src, c_src, dst, c_dst, [bytes(k) for k in c_keys])
            self._pending[op.op_id] = _Pending("write", dst, c_dst, c_keys, c_prio,
                                               src_tier=src, src_slots=c_src)
            plan.copies.append(op)
        if b_keys:
            self._plan_copy(src, b_keys, b_src, b_prio, plan, dst + 1)

    # -- load ----------------------------------------------------------------------------
    def plan_load(self, m: Match, dst: Sequence[int], *, promote: bool = True,
                  req_id: str = "", layerwise: bool = False) -> LoadOp:
        """Plan reading a match's blocks into engine blocks ``dst[i]``.

        The match keeps its pins (release it after the load reported). Blocks that
        come from a lower tier are promoted into the first tier when ``promote`` and
        it admits them: their slots are reserved here and reported as ``promote_op``.
        """
        self.check(m)
        if len(dst) != m.num_blocks:
            raise ValueError(f"onboard: match has {m.num_blocks} blocks but {len(dst)} "
                             "destination indices")
        with self.lock:
            self._enter()
            # Whole-list passes in C (zip, count, the keys' check): no Python per block.
            tiers, slots = (list(x) for x in zip(*m._pins)) if m._pins else ([], [])
            keys = cast(list[bytes], list(m.hashes)) if all_keys(m.hashes) else [
                bytes(h) for h in m.hashes]
            op = LoadOp(self._next_id(), tiers, slots, keys, list(dst),
                        req_id=req_id, layerwise=layerwise)
            self._pending[op.op_id] = _Pending("load", -1, slots, list(m.hashes), tiers=tiers)
            lower = [] if tiers.count(0) == len(tiers) else [
                i for i, t in enumerate(tiers) if t > 0]
            if promote and lower:
                self._plan_promote(op, lower, m.hashes)
            events = self._take_events()
        self._publish(events)
        return op

    def _plan_promote(self, op: LoadOp, lower: list[int], hashes: list[SequenceHash]) -> None:
        top = self.tiers[0]
        absent = [i for i in lower if hashes[i] not in top.registry]
        admit = self._admit(top, [hashes[i] for i in absent], [0] * len(absent))
        slots = [-1] * len(hashes)
        keys: list[SequenceHash] = []
        taken: list[int] = []
        for i, a in zip(absent, admit):
            s = top.registry.allocate(hashes[i]) if a else None
            if s is not None:
                slots[i] = s
                keys.append(hashes[i])
                taken.append(s)
        self._collect_evicted(0)
        if keys:
            op.promote_op = self._next_id()
            op.promote_tier = 0
            op.promote_slots = slots
            # Promoted blocks are already below: nothing cascades from them.
            self._pending[op.promote_op] = _Pending("write", 0, taken, keys, [0] * len(keys),
                                                    cascade=False)

    # -- reports -------------------------------------------------------------------------
    def apply(self, report: Report) -> Plan:
        """Settle reported operations; return what follows (cascade copies, discards).

        A write's slot is committed where it succeeded and freed (to the bottom of the
        free list) where it failed; a copy's source pins are dropped; a block that
        failed its read is dropped from its tier once unpinned. Unknown ids (an op
        already settled or abandoned) are ignored.
        """
        plan = Plan()
        with self.lock:
            self._enter()
            for op_id, failed in report.items():
                p = self._pending.pop(op_id, None)
                if p is None:
                    continue
                if p.kind == "load":
                    self._settle_load(p, failed)
                else:
                    self._settle_write(p, failed, plan)
            events = self._take_events()
            self._with_discards(plan)
        self._publish(events)
        return plan

    def _settle_load(self, p: _Pending, failed: frozenset[int]) -> None:
        for i in sorted(failed):
            if 0 <= i < len(p.keys):
                t = p.tiers[i]
                self.tiers[t].failed_reads += 1
                self.tiers[t].registry.doom(p.keys[i])
                self._collect_evicted(t)

    def _settle_write(self, p: _Pending, failed: frozenset[int], plan: Plan) -> None:
        ts = self.tiers[p.tier]
        reg = ts.registry
        cascade = p.cascade and self.write_through and p.tier + 1 < len(self.tiers)
        ok_keys: list[SequenceHash] = []
        ok_slots: list[int] = []
        ok_prios: list[int] = []
        if not failed:  # every write done (the common case): one call for the batch
            reg.commit_run(p.slots, p.prios, pinned=cascade)
            ts.stored += len(p.slots)
            ok_keys, ok_slots, ok_prios = p.keys, p.slots, p.prios
            if len(ok_prios) < len(ok_slots):
                ok_prios = [*ok_prios, *[0] * (len(ok_slots) - len(ok_prios))]
        for i, (s, k) in enumerate(zip(p.slots, p.keys) if failed else ()):
            prio = p.prios[i] if i < len(p.prios) else 0
            if i in failed:
                reg.abort(s, failed=True)
                ts.failed_writes += 1
                continue
            reg.commit(s, prio, pinned=cascade)
            ts.stored += 1
            ok_keys.append(k)
            ok_slots.append(s)
            ok_prios.append(prio)
        if p.src_tier >= 0:
            sreg = self.tiers[p.src_tier].registry
            for s in p.src_slots:
                sreg.unpin(s)
            self._collect_evicted(p.src_tier)
        if cascade and ok_keys:
            self._plan_copy(p.tier, ok_keys, ok_slots, ok_prios, plan)

    def fail(self, plan: Plan) -> Plan:
        """Settle every reported operation of ``plan`` as failed (its executor died)."""
        return self.apply(plan.all_failed())

    # -- restart, housekeeping, stats ------------------------------------------------------
    def restore(self, t: int, blocks: Sequence[tuple[int, SequenceHash]]) -> int:
        """Register blocks tier ``t`` found in storage at start; returns how many."""
        with self.lock:
            return self.tiers[t].registry.restore(blocks)

    def evict_all(self) -> Plan:
        """Drop every unpinned block from every tier; returns the discards."""
        with self.lock:
            self._enter()
            for ts in self.tiers:
                while ts.registry.evict() is not None:
                    pass
                self._collect_evicted(ts.index)
            events = self._take_events()
            plan = self._with_discards(Plan())
        self._publish(events)
        return plan

    def pins(self) -> int:
        """Pins held over all tiers (matches, loads and cascades in flight)."""
        with self.lock:
            self._enter()
            return sum(ts.registry.num_pinned for ts in self.tiers)

    def writing(self) -> int:
        """Slots reserved for writes that have not been reported yet."""
        with self.lock:
            return sum(len(p.slots) for p in self._pending.values() if p.kind == "write")

    def tier_stats(self, ts: TierState) -> dict[str, Any]:
        """The planner's counters of one tier."""
        r = ts.registry
        return {
            "type": ts.config.type,
            "medium": ts.medium,
            "capacity_blocks": r.capacity,
            "used_blocks": r.num_used,
            "evictable_blocks": r.num_evictable,
            "hits": ts.hits,
            "lookups": ts.lookups,
            "evictions": r.evictions,
            "stored_blocks": ts.stored,
            "rejected_blocks": ts.rejected,
            "overflow_blocks": ts.overflow_in,
            "adopted_blocks": ts.adopted,
            "skipped_writes": ts.skipped,
            "failed_writes": ts.failed_writes,
            "failed_reads": ts.failed_reads,
            "failed_slots": r.failed_slots,
        }

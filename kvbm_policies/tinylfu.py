"""W-TinyLFU eviction (Einziger, Friedman and Manes, 2017), as Caffeine runs it.

A new block enters a small LRU *window*. When the window is over its share, its oldest
block becomes a candidate for the main cache and must beat the main cache's own victim
(the oldest block of its *probation* segment) on the frequency sketch: the one seen
less often lately is evicted. The main cache is a segmented LRU: a block hit in
probation moves to *protected* (at most ``protected_ratio`` of the main cache), whose
overflow goes back to probation. One-off blocks (a long document read once, a
conversation that never comes back) thus pass through the window without displacing
blocks that keep being reused, and a block reused at long distances, which LRU would
have dropped, keeps its count in the sketch and wins its way back.

``window_ratio`` is the window's starting share of the capacity (Caffeine: 1 %). With
``adaptive`` (the default) a hill climber moves it each sample period toward the
share that hits more: recency-heavy traffic grows the window, frequency-heavy traffic
shrinks it, as Caffeine does.

Pinned blocks keep their segment (a hit while pinned still promotes) and leave the
segment's LRU order until released. All operations are O(1); the sketch costs four
byte reads per access.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.policy import EvictionPolicy

from .options import float_option, reject_unknown
from .sketch import _MAX, FrequencySketch, key_hash, sketch_positions

__all__ = ["WTinyLFUPolicy"]

# Window, probation, protected, and candidates: blocks the window pushed out that have
# not yet dueled a probation block (Caffeine keeps them at probation's recent end).
_W, _P, _Q, _C = 0, 1, 2, 3


def _bool_option(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no",
                                                             "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError(f"option {name!r}: value {value!r} is not a boolean; give true or false")


class WTinyLFUPolicy(EvictionPolicy):
    """Window LRU, then a frequency-sketch duel into a segmented LRU main cache."""

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("wtinylfu", options, ("window_ratio", "protected_ratio", "adaptive"))
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"wtinylfu: capacity must be at least one block, got {capacity!r}")
        super().__init__(capacity)
        wr = float_option("window_ratio", options.get("window_ratio", 0.01), 0.0, 1.0, hi_open=True)
        pr = float_option("protected_ratio", options.get("protected_ratio", 0.8), 0.0, 1.0)
        self.adaptive = _bool_option("adaptive", options.get("adaptive", True))
        self._window_max = max(1, round(wr * capacity))
        self._protected_ratio = pr
        self._protected_max = int(pr * (capacity - self._window_max))
        # Four counters per cached block and a reset every ten capacities of accesses,
        # as Caffeine sizes its sketch.
        self.sketch = FrequencySketch(4 * capacity, sample=10 * capacity)
        self._od: tuple[OrderedDict[SequenceHash, None], ...] = (
            OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict())
        self._window, self._probation, self._protected, self._cands = self._od
        self._rows = self.sketch._rows  # the sketch's four rows, for the inlined counting
        self._smask = self.sketch._mask
        # Keys' four sketch positions, computed in bulk by ``prepare_keys`` (the simulator).
        self._pre: dict[SequenceHash, tuple[int, int, int, int]] = {}
        self._seg: dict[SequenceHash, int] = {}  # every known key, evictable or pinned
        # Its four sketch positions, computed once.
        self._hash: dict[SequenceHash, tuple[int, int, int, int]] = {}
        # Per segment, pinned blocks included; only the window's and protected's are
        # read (their bounds), so the hot paths leave probation's and candidates' alone.
        self._size = [0, 0, 0, 0]
        # Hill climbing (Caffeine's SimpleClimber): one sample = ``capacity`` accesses.
        self._sample = max(16, capacity)
        self._hits = 0
        self._misses = 0
        self._prev_rate = 0.0
        self._step = max(1.0, 0.0625 * capacity)

    # -- views -----------------------------------------------------------------------------
    @property
    def window_max(self) -> int:
        """The window's current target size, in blocks."""
        return self._window_max

    def segment(self, key: SequenceHash) -> str | None:
        """``"window"``, ``"probation"`` or ``"protected"`` for a known block, else None."""
        s = self._seg.get(key)
        return None if s is None else ("window", "probation", "protected", "probation")[s]

    def prepare_keys(self, keys: Sequence[int]) -> None:
        """Compute the sketch positions of ``keys`` (ints) in bulk, ahead of their use.

        Optional, for the simulator, which knows a trace's keys up front: a key's four
        positions cost a dozen big-int operations one by one, a few nanoseconds in a
        numpy pass. The positions are the same either way (``_indexes``); keys that are
        not ints in [0, 2**63) are left to be computed when seen.
        """
        self._pre = sketch_positions(keys, self._smask)

    def _indexes(self, key: SequenceHash) -> tuple[int, int, int, int]:
        h = key_hash(key)
        m = self._smask
        return h & m, (h >> 16) & m, (h >> 32) & m, ((h >> 48) ^ (h >> 5)) & m

    # -- the contract ----------------------------------------------------------------------
    # ``insert``, ``touch`` and ``victim`` run on every access of the simulator and the
    # tier: the key's hash, the sketch's increment and frequency, the window's spill and
    # the drop are written out in them (a call costs as much as what it does).
    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        t = self._pre.get(key)
        if t is None:
            t = self._indexes(key)
        self._hash[key] = t
        # FrequencySketch.increment, inlined (conservative update, aging).
        r0, r1, r2, r3 = self._rows
        a, b, c, d = t
        ta, tb, tc, td = r0[a], r1[b], r2[c], r3[d]
        lo = ta
        if tb < lo:
            lo = tb
        if tc < lo:
            lo = tc
        if td < lo:
            lo = td
        if lo < _MAX:
            if ta == lo:
                r0[a] = lo + 1
            if tb == lo:
                r1[b] = lo + 1
            if tc == lo:
                r2[c] = lo + 1
            if td == lo:
                r3[d] = lo + 1
        sk = self.sketch
        sk._added += 1
        if sk._added >= sk.sample:
            sk.reset()
        seg, size = self._seg, self._size
        old = seg.get(key)
        if old is not None:  # re-registered while known: start over in the window
            self._od[old].pop(key, None)
            size[old] -= 1
        seg[key] = _W
        size[_W] += 1
        window = self._window
        window[key] = None
        wmax = self._window_max
        if size[_W] > wmax:  # _spill_window, inlined
            cands = self._cands
            while size[_W] > wmax and window:
                k = window.popitem(last=False)[0]
                cands[k] = None
                seg[k] = _C
                size[_W] -= 1
        self._misses += 1
        if self.adaptive and self._hits + self._misses >= self._sample:
            self._climb()

    def touch(self, key: SequenceHash) -> None:
        self._hits += 1
        seg = self._seg
        s = seg.get(key)
        if s is None:
            self.sketch.add(key)
            return
        r0, r1, r2, r3 = self._rows
        a, b, c, d = self._hash[key]
        ta, tb, tc, td = r0[a], r1[b], r2[c], r3[d]
        lo = ta
        if tb < lo:
            lo = tb
        if tc < lo:
            lo = tc
        if td < lo:
            lo = td
        if lo < _MAX:
            if ta == lo:
                r0[a] = lo + 1
            if tb == lo:
                r1[b] = lo + 1
            if tc == lo:
                r2[c] = lo + 1
            if td == lo:
                r3[d] = lo + 1
        sk = self.sketch
        sk._added += 1
        if sk._added >= sk.sample:
            sk.reset()
        od = self._od[s]
        if s in (_P, _C):
            if od.pop(key, 0) is None:  # evictable: to protected's recent end
                self._protected[key] = None
            seg[key] = _Q
            size = self._size
            size[s] -= 1
            size[_Q] += 1
            if size[_Q] > self._protected_max:
                self._demote_protected()
        elif key in od:
            od.move_to_end(key)

    def pin(self, key: SequenceHash) -> None:
        s = self._seg.get(key)
        if s is not None:
            self._od[s].pop(key, None)

    def unpin(self, key: SequenceHash) -> None:
        s = self._seg.get(key)
        if s is None:
            self.insert(key)
        else:
            self._od[s][key] = None

    def remove(self, key: SequenceHash) -> None:
        s = self._seg.get(key)
        if s is not None and self._od[s].pop(key, 0) is None:
            del self._seg[key]
            del self._hash[key]
            self._size[s] -= 1

    def victim(self) -> SequenceHash | None:
        cands = self._cands
        size, seg, hashes = self._size, self._seg, self._hash
        if cands:
            cand = next(iter(cands))
            probation = self._probation
            if probation:
                mv, ms = next(iter(probation)), _P
            elif self._protected:
                mv, ms = next(iter(self._protected)), _Q
            else:
                mv, ms = None, _P
            if mv is not None:
                # The duel: the candidate stays only if seen more often lately than the
                # block it would push out (ties keep the incumbent). The sketch's
                # ``frequency`` of both, inlined.
                r0, r1, r2, r3 = self._rows
                a, b, c, d = hashes[cand]
                fc = r0[a]
                x = r1[b]
                if x < fc:
                    fc = x
                x = r2[c]
                if x < fc:
                    fc = x
                x = r3[d]
                if x < fc:
                    fc = x
                a, b, c, d = hashes[mv]
                fv = r0[a]
                x = r1[b]
                if x < fv:
                    fv = x
                x = r2[c]
                if x < fv:
                    fv = x
                x = r3[d]
                if x < fv:
                    fv = x
                if fc > fv:
                    del cands[cand]
                    probation[cand] = None
                    seg[cand] = _P
                    del hashes[mv]  # _drop, inlined
                    del seg[mv]
                    del self._od[ms][mv]
                    size[ms] -= 1
                    return mv
            del hashes[cand]
            del seg[cand]
            del cands[cand]
            return cand
        for od in (self._probation, self._protected, self._window):
            if od:
                return self._drop(next(iter(od)))
        return None

    def __len__(self) -> int:
        od = self._od
        return len(od[0]) + len(od[1]) + len(od[2]) + len(od[3])

    # -- internals -------------------------------------------------------------------------
    def _drop(self, key: SequenceHash) -> SequenceHash:
        del self._hash[key]
        s = self._seg.pop(key)
        del self._od[s][key]
        self._size[s] -= 1
        return key

    def _spill_window(self) -> None:
        window, cands = self._od[_W], self._od[_C]
        while self._size[_W] > self._window_max and window:
            k = window.popitem(last=False)[0]
            cands[k] = None
            self._seg[k] = _C
            self._size[_W] -= 1
            self._size[_C] += 1

    def _demote_protected(self) -> None:
        protected = self._od[_Q]
        while self._size[_Q] > self._protected_max and protected:
            k = protected.popitem(last=False)[0]
            self._od[_P][k] = None
            self._seg[k] = _P
            self._size[_Q] -= 1
            self._size[_P] += 1

    def _climb(self) -> None:
        # Caffeine's hill climber: keep moving the window's size in the direction that
        # raised the hit rate over the last sample, turn around when it fell; steps
        # shrink so that the size settles.
        total = self._hits + self._misses
        rate = self._hits / total
        delta = rate - self._prev_rate
        step = self._step if delta >= 0 else -self._step
        self._step = max(1.0, abs(step) * 0.98) * (1 if step >= 0 else -1)
        self._prev_rate = rate
        self._hits = self._misses = 0
        c = self.capacity
        new = int(min(max(1, self._window_max + round(self._step)), c - 1 if c > 1 else 1))
        self._window_max = new
        self._protected_max = int(self._protected_ratio * (c - new))
        self._demote_protected()
        self._spill_window()

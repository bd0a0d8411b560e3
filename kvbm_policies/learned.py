"""Learned insertion: LRU that learns online which kinds of new blocks are read again.

A cache loses most where it fills with blocks read once: on the public Mooncake trace
58 % of the ids are never read again, and an LRU told at insertion which ones (an
oracle) inserts them at its cold end and reaches 0.87 of OPT instead of 0.71. This
policy learns what it can of that from the past only, from what the registry's calls
reveal when a block is inserted (the registry passes no parent, request or length):

- whether the block is inserted behind a hit (a follow-up request extends a cached
  prefix: ``touch`` calls came just before) or in a run of inserts with no hit
  before it (a new prefix; consecutive requests with no hit cannot be told apart, so
  such a run may span several of them);
- its depth: hits plus inserts since the run started, as a class of its log2.

Per class (2 × 32) it counts, over a sample of runs (one in ``sample``, inserted as
LRU would), how many blocks were inserted and how many of those were hit before
being evicted. A class whose estimated reuse, ``(hits + 1) / (inserted + 2)``, is
under ``threshold`` once ``min_samples`` of its blocks were sampled is judged cold,
but only when no deeper class of its kind is judged worth keeping (a block is hit
only behind its whole prefix, so a run goes cold from a depth on, and stays cold to
its end). Every unsampled block of a cold class skips the LRU: it waits in a FIFO of
cold blocks, which gives the victims first once it holds more than ``probation`` ×
the capacity (default 0: a cold block is the next victim, in effect not cached).
Counts are halved when a class reaches ``window`` sampled blocks (default 4 × the
capacity), so the estimate follows a workload that changes. Everything else is LRU:
a hit, or a release, puts a block at the recent end of the LRU.

The sample keeps the estimate honest: a class inserted cold is never hit, which would
otherwise confirm its own verdict. Whole runs are sampled because a block is hit only
behind its whole prefix. With ``threshold=0`` the policy is LRU exactly.

Every operation is O(1) but a verdict's change (32 steps): two ordered dicts, a dict
of the sampled blocks awaiting their first hit, and lists of 64 counts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.policy import EvictionPolicy

from .options import float_option, int_option, reject_unknown

__all__ = ["LearnedPolicy"]

_HIT, _INSERT, _RELEASE = 1, 2, 3  # the last call that tells the request's structure
_DEPTHS = 32  # log2 depth classes: bit_length of 0 .. 2**31 - 1, the last one open-ended
_OPTIONS = ("min_samples", "probation", "sample", "threshold", "window")


class LearnedPolicy(EvictionPolicy):
    """LRU that inserts at its cold end new blocks of a class it has seen rarely reused."""

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("learned", options, _OPTIONS)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"learned: capacity must be at least one block, got {capacity!r}")
        super().__init__(capacity)
        self.threshold = float_option("threshold", options.get("threshold", 0.1), 0.0, 1.0)
        self.sample = int_option("sample", options.get("sample", 16), 1)
        self.min_samples = int_option("min_samples", options.get("min_samples", 32), 1)
        self.window = int_option("window", options.get("window", 4 * capacity), 2)
        share = float_option("probation", options.get("probation", 0.0), 0.0, 1.0)
        self._probation = int(share * capacity)
        self._order: OrderedDict[SequenceHash, None] = OrderedDict()  # victim first
        self._cold_q: OrderedDict[SequenceHash, None] = OrderedDict()  # cold blocks, FIFO
        self._tracked: dict[SequenceHash, int] = {}  # sampled block -> its class, until hit
        self._inserted = [0.0] * (2 * _DEPTHS)
        self._reused = [0.0] * (2 * _DEPTHS)
        self._verdict = [0] * (2 * _DEPTHS)  # 0: too few samples, 1: keep, 2: cold
        self._cold = [False] * (2 * _DEPTHS)  # the verdicts, closed towards the depth
        self._run_cold = False  # this run has gone cold: the rest of it follows
        self._last = _RELEASE
        self._base = 0  # 0: a run of inserts with no hit before it; _DEPTHS: behind a hit
        self._depth = 0
        self._runs = 0
        self._sampled = False

    def reuse_estimate(self, behind_hit: bool, depth: int) -> float:
        """The estimated share of sampled blocks of this class hit before eviction."""
        c = (_DEPTHS if behind_hit else 0) + min(depth.bit_length(), _DEPTHS - 1)
        return (self._reused[c] + 1.0) / (self._inserted[c] + 2.0)

    def is_cold(self, behind_hit: bool, depth: int) -> bool:
        """Whether a new, unsampled block of this class goes to the cold queue now."""
        return self._cold[(_DEPTHS if behind_hit else 0) + min(depth.bit_length(), _DEPTHS - 1)]

    def _new_run(self, base: int) -> None:
        self._base = base
        self._depth = 0
        self._runs += 1
        self._sampled = self._runs % self.sample == 0
        self._run_cold = False

    def _judge(self, c: int) -> None:
        ins = self._inserted[c]
        verdict = 0 if ins < self.min_samples else (
            2 if (self._reused[c] + 1.0) / (ins + 2.0) < self.threshold else 1)
        if verdict == self._verdict[c]:
            return
        self._verdict[c] = verdict
        # A block is hit only behind its whole prefix: a class goes cold only when no
        # deeper class of its kind is judged worth keeping (cold from a depth on).
        base = c - c % _DEPTHS
        keep = False
        for d in range(base + _DEPTHS - 1, base - 1, -1):
            v = self._verdict[d]
            keep = keep or v == 1
            self._cold[d] = v == 2 and not keep

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        if self._last == _RELEASE:
            self._new_run(0)
        self._last = _INSERT
        c = self._base + min(self._depth.bit_length(), _DEPTHS - 1)
        self._depth += 1
        order = self._order
        order.pop(key, None)
        self._cold_q.pop(key, None)
        if self._sampled:
            order[key] = None
            self._tracked[key] = c
            n = self._inserted[c] + 1.0
            if n >= self.window:
                n /= 2.0
                self._reused[c] /= 2.0
            self._inserted[c] = n
            self._judge(c)
        else:
            self._tracked.pop(key, None)
            if self._run_cold or self._cold[c]:
                self._run_cold = True
                self._cold_q[key] = None
            else:
                order[key] = None

    def touch(self, key: SequenceHash) -> None:
        if self._last != _HIT:
            self._new_run(_DEPTHS)
        self._last = _HIT
        self._depth += 1
        c = self._tracked.pop(key, None)
        if c is not None:
            self._reused[c] += 1.0
            self._judge(c)
        if key in self._order:
            self._order.move_to_end(key)

    def pin(self, key: SequenceHash) -> None:
        self._order.pop(key, None)
        self._cold_q.pop(key, None)

    def unpin(self, key: SequenceHash) -> None:
        # A released block was hit (or committed pinned): it joins the LRU as any other.
        self._last = _RELEASE
        self._cold_q.pop(key, None)
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: SequenceHash) -> None:
        self._order.pop(key, None)
        self._cold_q.pop(key, None)
        self._tracked.pop(key, None)

    def victim(self) -> SequenceHash | None:
        cold = self._cold_q
        if cold and (len(cold) > self._probation or not self._order):
            return cold.popitem(last=False)[0]  # never tracked: cold blocks are unsampled
        if not self._order:
            return None
        key = self._order.popitem(last=False)[0]
        if self._tracked:
            self._tracked.pop(key, None)
        return key

    def __len__(self) -> int:
        return len(self._order) + len(self._cold_q)

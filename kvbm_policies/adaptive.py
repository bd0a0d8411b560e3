"""An adaptive policy: follow whichever candidate policy would have hit more lately.

No single policy wins on every traffic: LIRS is far ahead on many chat conversations
taking turns and far behind on a production conversation trace where LRU is near
OPT. This policy runs the tier with one candidate (the *leader*) and keeps a small
*shadow* cache per candidate, fed the same accesses, to learn which would hit more:

- Shadows see a sample of the blocks (spatial sampling, as SHARDS does for miss-ratio
  curves): a block is in the sample when its hash falls in 1 of ``rate`` buckets, and
  each shadow holds ``capacity / rate`` blocks, so a shadow costs about ``1 / rate``
  of a policy per access. Each access (a hit, or a new block) of a sampled block is
  looked up in every shadow: a hit there counts for that candidate.
- Every ``period`` sampled accesses the counts are compared; if another candidate hit
  at least ``margin`` more (relative) than the leader, it becomes the leader. The
  counts then halve, so the choice follows a change of traffic within a few periods.
  The margin keeps two candidates that hit about as often from trading places, each
  switch costing the new leader a short warm-up.
- A new leader is built from the old one's eviction order (drained victim by victim,
  oldest first) plus the pinned blocks, then warmed by replaying the hits of the last
  ``capacity`` accesses as touches, so that it starts knowing which blocks are hot
  (LIRS's protected set, ARC's frequent list) instead of treating every block as new.
  That is O(capacity), which the period amortizes.

Per access the cost is the leader's, a hash, and ``candidates / rate`` shadow
accesses. Options: ``candidates`` (names, default ``"lru,lirs"``), ``rate`` (a power
of two; default: the largest up to 64 that leaves every shadow 256 blocks),
``period`` (sampled accesses; default half a shadow's capacity), ``margin``
(default 0.1). The defaults are measured (``docs/benchmarks/policies.md``): a third
candidate (ARC) made the choice flap on the multi-turn and long-docs workloads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvbm.hashing import SequenceHash
from kvbm.policy import EvictionPolicy, LRUPolicy

from .options import float_option, int_option, reject_unknown
from .sketch import _int_keys, key_int

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1

__all__ = ["AdaptivePolicy", "CANDIDATES"]


def _candidates() -> dict[str, Callable[..., EvictionPolicy]]:
    from .eviction import ARCPolicy, LFUPolicy, LIRSPolicy, S3FIFOPolicy
    from .prefix import PrefixLRUPolicy
    from .tinylfu import WTinyLFUPolicy

    return {"lru": LRUPolicy, "lfu": LFUPolicy, "arc": ARCPolicy, "s3fifo": S3FIFOPolicy,
            "lirs": LIRSPolicy, "wtinylfu": WTinyLFUPolicy, "prefix": PrefixLRUPolicy}


#: Policies a candidate may name (the built-in ones: a shadow is built per candidate).
CANDIDATES = ("lru", "lfu", "arc", "s3fifo", "lirs", "wtinylfu", "prefix")


class _Shadow:
    """A candidate's small cache over the sampled blocks: metadata only, no pins."""

    __slots__ = ("capacity", "hits", "insert", "policy", "resident", "touch", "victim")

    def __init__(self, policy: EvictionPolicy, capacity: int) -> None:
        self.policy = policy
        self.capacity = capacity
        self.resident: set[SequenceHash] = set()
        self.hits = 0.0
        self.touch = policy.touch
        self.insert = policy.insert
        self.victim = policy.victim

    def access(self, key: SequenceHash) -> None:
        """One access of a sampled block: a hit, or a new block (evicting when full)."""
        resident = self.resident
        if key in resident:
            self.hits += 1
            self.touch(key)
            return
        if len(resident) >= self.capacity:
            v = self.victim()
            if v is not None:
                resident.discard(v)
        resident.add(key)
        self.insert(key)


class AdaptivePolicy(EvictionPolicy):
    """Evict as the candidate whose shadow cache hit most lately; switch when another leads."""

    def __init__(self, capacity: int, **options: Any) -> None:
        reject_unknown("adaptive", options, ("candidates", "rate", "period", "margin"))
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"adaptive: capacity must be at least one block, got {capacity!r}")
        super().__init__(capacity)
        raw = options.get("candidates", "lru,lirs")
        names = [n.strip() for n in raw.split(",")] if isinstance(raw, str) else [str(n) for n in raw]
        names = [n for n in names if n]
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"option 'candidates': value {raw!r} must name distinct policies "
                             f"among {', '.join(CANDIDATES)}")
        self.candidates = names
        self._factories = _candidates()
        if "rate" in options:
            rate = int_option("rate", options["rate"], 1, 1 << 20)
            if rate & (rate - 1):
                raise ValueError(f"option 'rate': value {rate} is not a power of two")
        else:
            rate = 1
            while rate < 64 and capacity // (rate * 2) >= 256:
                rate *= 2
        self.rate = rate
        shadow_cap = max(1, capacity // rate)
        self.period = int_option("period", options.get("period", max(1, shadow_cap // 2)), 1)
        self.margin = float_option("margin", options.get("margin", 0.1), 0.0)
        self._mask = rate - 1
        self._shadows = [_Shadow(self._factories[n](shadow_cap), shadow_cap) for n in names]
        self._leader_index = 0
        self._pinned: set[SequenceHash] = set()
        self._recent: deque[SequenceHash] = deque(maxlen=capacity)  # last accesses, for a switch
        self._remember = self._recent.append
        self._sampled = 0
        self.switches = 0
        self._pre: frozenset[SequenceHash] | None = None  # the sampled keys, when prepared
        self._keys: list[int] | None = None  # the keys prepared, for a new leader
        self._lead(self._factories[names[0]](capacity))

    def _lead(self, policy: EvictionPolicy) -> None:
        # The leader's bound methods, looked up once: every call of the tier goes through
        # one of them, and an attribute lookup per call is a tenth of LRU's work.
        self._leader = policy
        self._l_insert = policy.insert
        self._l_touch = policy.touch
        self._l_pin = policy.pin
        self._l_unpin = policy.unpin
        self._l_victim = policy.victim

    # -- views -----------------------------------------------------------------------------
    @property
    def leader(self) -> str:
        """The candidate now choosing victims."""
        return self.candidates[self._leader_index]

    def shadow_hits(self) -> dict[str, float]:
        """Each candidate's decayed shadow hits, as the next comparison will see them."""
        return {n: s.hits for n, s in zip(self.candidates, self._shadows)}

    # -- the contract ----------------------------------------------------------------------
    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        self._l_insert(key, priority)
        self._remember(key)
        pre = self._pre
        if pre is not None:  # the simulator gave every key's sample membership
            if key in pre:
                self._sample(key)
            return
        # In the sample when bits 40.. of the key's mixed hash are zero under the mask
        # (inlined: this runs on every access).
        k = key if type(key) is int else key_int(key)  # type: ignore[comparison-overlap]
        if not (k * _GOLDEN) >> 40 & self._mask:  # bits 40.. below 64: no need to mask
            self._sample(key)

    def touch(self, key: SequenceHash) -> None:
        self._l_touch(key)
        self._remember(key)
        pre = self._pre
        if pre is not None:
            if key in pre:
                self._sample(key)
            return
        k = key if type(key) is int else key_int(key)  # type: ignore[comparison-overlap]
        if not (k * _GOLDEN) >> 40 & self._mask:  # bits 40.. below 64: no need to mask
            self._sample(key)

    def prepare_keys(self, keys: Sequence[int]) -> None:
        """Decide the sample membership of ``keys`` in one numpy pass (the simulator's
        optional hook, as ``replay`` calls it): the same test as ``insert`` makes, bits
        40.. of ``key * _GOLDEN`` under the mask, which uint64 wrapping keeps intact.
        Only when every key is an int in [0, 2**63); otherwise keys are tested as seen."""
        ints, k = _int_keys(keys)
        if len(ints) != len(keys):
            return
        with np.errstate(over="ignore"):
            h = k * np.uint64(_GOLDEN)
        hit = ((h >> np.uint64(40)) & np.uint64(self._mask)) == 0
        self._pre = frozenset(np.asarray(ints, dtype=object)[hit].tolist())
        self._keys = list(ints)
        sampled = list(self._pre)  # the shadows see only these
        for sh in self._shadows:
            prep = getattr(sh.policy, "prepare_keys", None)
            if prep is not None:
                prep(sampled)
        prep = getattr(self._leader, "prepare_keys", None)
        if prep is not None:
            prep(self._keys)

    def pin(self, key: SequenceHash) -> None:
        self._pinned.add(key)
        self._l_pin(key)

    def unpin(self, key: SequenceHash) -> None:
        self._pinned.discard(key)
        self._l_unpin(key)

    def remove(self, key: SequenceHash) -> None:
        self._leader.remove(key)

    def victim(self) -> SequenceHash | None:
        # Not the leader's bound method set on the instance: callers (the replay, the
        # registry) bind ``victim`` once and would keep the old leader's after a switch.
        return self._l_victim()

    def __len__(self) -> int:
        return len(self._leader)

    # -- learning ---------------------------------------------------------------------------
    def _sample(self, key: SequenceHash) -> None:
        for s in self._shadows:
            resident = s.resident
            if key in resident:  # _Shadow.access, inlined: once per sampled access
                s.hits += 1
                s.touch(key)
                continue
            if len(resident) >= s.capacity:
                v = s.victim()
                if v is not None:
                    resident.discard(v)
            resident.add(key)
            s.insert(key)
        self._sampled += 1
        if self._sampled >= self.period:
            self._sampled = 0
            self._decide()

    def _decide(self) -> None:
        shadows = self._shadows
        lead = shadows[self._leader_index].hits
        best = max(range(len(shadows)), key=lambda i: (shadows[i].hits, i == self._leader_index))
        if best != self._leader_index and shadows[best].hits > lead * (1 + self.margin):
            self._switch(best)
        for s in shadows:
            s.hits /= 2

    def _switch(self, index: int) -> None:
        old = self._leader
        new = self._factories[self.candidates[index]](self.capacity)
        prep = getattr(new, "prepare_keys", None)
        if prep is not None and self._keys is not None:
            # Only in the simulator, and only for a candidate that takes it (W-TinyLFU):
            # O(the trace's distinct keys) in numpy, about 0.6 s per million keys, per
            # switch to it; the default candidates (lru, lirs) take none.
            prep(self._keys)
        order: list[SequenceHash] = []
        while (k := old.victim()) is not None:
            order.append(k)
        for k in order:  # oldest first, as the old leader would have evicted them
            new.insert(k)
        for k in self._pinned:
            new.insert(k)
            new.pin(k)
        resident = set(order) | self._pinned
        seen: set[SequenceHash] = set()
        for k in self._recent:
            # The first access in the window made the block (it is in ``order``); each
            # later one was a hit the new leader should know about.
            if k in seen and k in resident:
                new.touch(k)
            seen.add(k)
        self._lead(new)
        self._leader_index = index
        self.switches += 1

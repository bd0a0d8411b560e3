"""Admission filters: Dynamo's frequency filter and the priority-prefix filter.

A filter sees the blocks one offload offers to a tier, in request order, and says
which the tier may write. Presence needs no filter here: the manager never offers a
tier a block its registry holds or is writing, and the shared s3 tier checks its
bucket itself (existence cache, conditional PUT).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.policy import AdmissionPolicy

from .options import float_option, int_option, reject_unknown

__all__ = ["FrequencyFilter", "PriorityPrefixFilter"]

#: Counts double on every offer; capping them keeps an often-offered block's count a
#: machine integer (Dynamo's is an i64) without changing any decision.
_MAX_COUNT = 1 << 62


class FrequencyFilter(AdmissionPolicy):
    """Admit a block once it has been offered often enough, with Dynamo KVBM's semantics.

    A block's count is set to 1 on its first offer and doubled on each later offer;
    it is admitted when the count reaches ``threshold``. Every ``period`` seconds each
    count drops by 1 and counts at 0 or below are forgotten. The map holds at most
    ``max_entries`` blocks: when an offer takes it past that, decay runs again and
    again (as one pass) until it fits, and the period restarts.

    Decay is applied lazily on the next offer, for every period that has passed, so no
    thread runs and a test drives time through ``clock``.
    """

    def __init__(
        self,
        threshold: Any = 2,
        period: Any = 600.0,
        max_entries: Any = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        reject_unknown("frequency", options, ("threshold", "period", "max_entries"))
        super().__init__()
        self.threshold = int_option("threshold", threshold, 1, _MAX_COUNT)
        self.period = float_option("period", period, 0.0, lo_open=True)
        self.max_entries = int_option("max_entries", max_entries, 1)
        self._clock = clock
        self._counts: dict[SequenceHash, int] = {}
        self._last_decay = clock()
        self._lock = threading.Lock()  # the cascade offers from worker threads
        self.decays = 0

    def __len__(self) -> int:
        """Blocks the filter remembers, after any decay that is due."""
        with self._lock:
            self._decay_due()
            return len(self._counts)

    def count(self, key: SequenceHash) -> int:
        """The block's current count (0 when unknown)."""
        with self._lock:
            self._decay_due()
            return self._counts.get(key, 0)

    def admit(
        self, keys: Sequence[SequenceHash], priorities: Sequence[int] | None = None
    ) -> list[bool]:
        """Count one offer of each key; True where its count reached the threshold."""
        out: list[bool] = []
        with self._lock:
            self._decay_due()
            counts, threshold = self._counts, self.threshold
            for k in keys:
                c = counts.get(k)
                c = 1 if c is None else min(c * 2, _MAX_COUNT)
                counts[k] = c
                out.append(c >= threshold)
            if len(counts) > self.max_entries:
                self._shrink()
        return out

    def _decay_due(self) -> None:
        now = self._clock()
        elapsed = now - self._last_decay
        if elapsed < self.period:
            return
        steps = int(elapsed // self.period)
        self._last_decay += steps * self.period
        self._decay(steps)

    def _decay(self, steps: int) -> None:
        # ``steps`` passes of "decrement all, drop those at 0" equal one pass
        # subtracting ``steps``: a count that reaches 0 stays forgotten.
        self._counts = {k: c - steps for k, c in self._counts.items() if c > steps}
        self.decays += steps

    def _shrink(self) -> None:
        # The fewest decay passes that bring the map within max_entries: the
        # (excess)-th smallest count (each pass k drops every count <= k).
        excess = len(self._counts) - self.max_entries
        steps = sorted(self._counts.values())[excess - 1]
        self._decay(steps)
        self._last_decay = self._clock()


class PriorityPrefixFilter(AdmissionPolicy):
    """Offload a request's blocks only up to its first block below ``min_priority``.

    Dynamo's ``DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY``: blocks are offered in
    request order, and once one has a priority under the threshold it and every
    later block of the offer are skipped, as a later block is useless without it.
    ``min_priority`` is an integer from 0 to 100 (strings accepted, as environment
    variables give them); with no priorities given every block counts as 0.
    """

    def __init__(self, min_priority: Any = 0, **options: Any) -> None:
        reject_unknown("priority_prefix", options, ("min_priority",))
        super().__init__()
        self.min_priority = int_option("min_priority", min_priority, 0, 100)

    def admit(
        self, keys: Sequence[SequenceHash], priorities: Sequence[int] | None = None
    ) -> list[bool]:
        """True for the leading blocks whose priority is at least ``min_priority``."""
        n = len(keys)
        if priorities is None:
            return [self.min_priority <= 0] * n
        lo = self.min_priority
        for i in range(n):
            if priorities[i] < lo:
                return [True] * i + [False] * (n - i)
        return [True] * n

"""Admission filters: Dynamo's frequency filter, the priority-prefix filter, a frequency
sketch (TinyLFU's doorkeeper for a lower tier) and a reuse-window filter.

A filter sees the blocks one offload offers to a tier, in request order, and says
which the tier may write. Presence needs no filter here: the manager never offers a
tier a block its registry holds or is writing, and the shared s3 tier checks its
bucket itself (existence cache, conditional PUT).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.policy import AdmissionPolicy

from .options import float_option, int_option, reject_unknown
from .sketch import FrequencySketch

__all__ = ["FrequencyFilter", "PriorityPrefixFilter", "ReuseWindowFilter", "SketchFilter"]

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


class SketchFilter(AdmissionPolicy):
    """Admit a block once a frequency sketch has seen it offered ``threshold`` times lately.

    Dynamo's rule (write a block on its second offer, forget counts as they age) in
    TinyLFU's bounded memory: the counts live in a ``FrequencySketch`` of ``4 x width``
    bytes (4 MiB by default, for any number of blocks, where a dict of a million
    counts takes about 100 MiB), and they halve every ``sample`` offers (default ten
    per counter) instead of every period of wall-clock time, so what "lately" means
    follows the traffic, not the clock. Counts saturate at 15; ``threshold`` is 1 to 15.
    """

    def __init__(self, threshold: Any = 2, width: Any = 1 << 20, sample: Any = None,
                 **options: Any) -> None:
        reject_unknown("tinylfu", options, ("threshold", "width", "sample"))
        super().__init__()
        self.threshold = int_option("threshold", threshold, 1, 15)
        w = int_option("width", width, 16, 1 << 28)
        s = None if sample is None else int_option("sample", sample, 1)
        self.sketch = FrequencySketch(w, s)
        self._lock = threading.Lock()  # the cascade offers from worker threads

    def admit(
        self, keys: Sequence[SequenceHash], priorities: Sequence[int] | None = None
    ) -> list[bool]:
        """Count one offer of each key; True where its estimate reached the threshold."""
        with self._lock:
            add, lo = self.sketch.add, self.threshold
            return [add(k) >= lo for k in keys]


class ReuseWindowFilter(AdmissionPolicy):
    """Admit a block offered again within the last ``window`` distinct blocks offered.

    A block is offered to a tier only while the tier does not hold it, so a second offer
    soon after the first means the block is reused; the window bounds how soon. Set to
    about the tier's capacity in blocks, it admits what the tier would keep until its
    reuse and refuses what it would evict first: on conversations taking turns (a loop
    larger than the tier) it writes a stable subset instead of rewriting every block
    every turn. Memory: one entry per block in the window (an ordered dict).
    ``offers`` (default 2) is the offers that admit, counting this one.

    ``window`` is a block count, or ``"Nx"``: N times the tier's ``capacity`` in blocks,
    which the chain passes to the filter (``kvbm.chain.admission_options``). The default
    is ``"2x"`` (measured in ``docs/benchmarks/policies.md``), or 1,000,000 blocks for a
    filter built without a capacity.
    """

    def __init__(self, window: Any = None, offers: Any = 2, capacity: Any = None,
                 **options: Any) -> None:
        reject_unknown("reuse", options, ("window", "offers", "capacity"))
        super().__init__()
        cap = None if capacity is None else int_option("capacity", capacity, 1)
        if window is None:
            window = "2x" if cap is not None else 1_000_000
        if isinstance(window, str) and window.strip().lower().endswith("x"):
            try:
                factor = float(window.strip()[:-1])
            except ValueError:
                factor = -1.0
            if factor <= 0:
                raise ValueError(f"option 'window': value {window!r} is not a positive multiple "
                                 "of the tier's size; give e.g. 2x, or a block count")
            if cap is None:
                raise ValueError(f"option 'window': value {window!r} is a multiple of the tier's "
                                 "size, but this filter was built without one; give a block count")
            window = max(1, round(factor * cap))
        self.capacity = cap
        self.window = int_option("window", window, 1)
        self.offers = int_option("offers", offers, 1)
        self._seen: OrderedDict[SequenceHash, int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Blocks in the window."""
        return len(self._seen)

    def admit(
        self, keys: Sequence[SequenceHash], priorities: Sequence[int] | None = None
    ) -> list[bool]:
        """Count one offer of each key in the window; True where it reached ``offers``."""
        out: list[bool] = []
        with self._lock:
            seen, need, window = self._seen, self.offers, self.window
            for k in keys:
                c = seen.pop(k, 0) + 1
                seen[k] = c
                out.append(c >= need)
                if len(seen) > window:
                    seen.popitem(last=False)
        return out

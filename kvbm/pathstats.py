"""Counters of one transfer path (``offload:host``, ``onboard:disk`` …): blocks, bytes,
failures, and the time the path was busy, from which its throughput is read."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Busy segments a path remembers; a transfer reaching back past the oldest counts
#: that stretch again (busy time over- never under-counted: the rate can only read low).
_BUSY_SEGMENTS = 64


@dataclass
class PathStats:
    """Blocks, bytes and seconds moved along one transfer path (``offload:host`` …).

    ``seconds`` is the time the path was busy: the union of its transfers' intervals,
    so two cascade copies into one disk that run at once count their shared time
    once, and ``gbps`` is the path's throughput, comparable with fio's or raw boto3's
    aggregate over several jobs. ``call_seconds`` sums each transfer's own duration.
    """

    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0
    call_seconds: float = 0.0
    _segs: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def add(self, start: float, end: float) -> float:
        """Count one transfer over ``[start, end]`` (ends arrive in order: each is
        counted when it finishes); returns the busy seconds it added."""
        if end <= start:
            return 0.0
        self.call_seconds += end - start
        segs, lo, hi, covered = self._segs, start, end, 0.0
        while segs and segs[-1][1] > start:
            s, e = segs.pop()
            covered += max(0.0, min(e, end) - max(s, start))
            lo, hi = min(lo, s), max(hi, e)
        segs.append((lo, hi))
        if len(segs) > _BUSY_SEGMENTS:
            del segs[0]
        added = (end - start) - covered
        self.seconds += added
        return added

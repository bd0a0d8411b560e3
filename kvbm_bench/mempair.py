"""The memory paths' limit paired with their figures, window by window.

The memory copy limit moves within one ``kvbm bench`` run: on this 2-vCPU VM the
samples of one run (64 MiB, best of 1 and 2 threads, every 8 turns) went from 22.9 to
11.0 GB/s and back (a neighbour or the bench's own cascade checksums holding the other
CPU turns the 2-thread copy into a 1-thread one). Dividing the whole run's figure by
the median sample pairs a path's batches with samples taken at other times. Here the
workload's turns between two samples are a window: each memory path's figure in a
window (its bytes over its seconds there) is divided by the better of the samples
right before and after it, as ``diskpair`` pairs fio and ``bench/disk.py`` pairs its
paths; the path's ratio is the median of its windows' ratios. A window in which a
path moved fewer than ``MIN_BLOCKS`` blocks gives no pair.
"""

from __future__ import annotations

from typing import Any

from .diskpair import Pair, put_pairs

#: Fewer blocks than this in a window give no pair (a figure of a few blocks is noise).
MIN_BLOCKS = 8


class MemPairs:
    """Limit samples with the executor's path counters at each (``sample``)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[str, tuple[int, int, float]]]] = []
        self.pairs: dict[str, list[Pair]] = {}

    def sample(self, gbps: float, paths: dict[str, dict[str, Any]]) -> None:
        """Record a limit sample and every path's blocks, bytes and seconds so far."""
        snap = {k: (int(v["blocks"]), int(v["bytes"]), float(v["seconds"])) for k, v in paths.items()}
        if self.samples:
            before, prev = self.samples[-1]
            for name, (blocks, nbytes, secs) in snap.items():
                b0, n0, s0 = prev.get(name, (0, 0, 0.0))
                if blocks - b0 >= MIN_BLOCKS and secs > s0:
                    pair = Pair((nbytes - n0) / (secs - s0) / 1e9, max(before, gbps))
                    self.pairs.setdefault(name, []).append(pair)
        self.samples.append((gbps, snap))

    def attach(self, path: str, p: dict[str, Any], what: str) -> bool:
        """Set ``path``'s limit, ratio (median of its windows) and pairs in ``p``; False
        where it has none."""
        pairs = self.pairs.get(path)
        if not pairs:
            return False
        ratios = put_pairs(p, pairs)
        p["limit"] = (f"{what}, paired around {len(pairs)} windows (median; pairs "
                      f"{min(ratios):.2f}-{max(ratios):.2f})")
        return True

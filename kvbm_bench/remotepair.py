"""A remote tier's read path beside a raw pipeline of the same work.

``limits.remote_raw_read_gbps`` times a raw NIXL READ alone. In ``kvbm bench`` the
onboard:remote path also copies every block into the engine's layer-separate tensors
(the READ lands in a staging buffer or a host-tier slot first): in
`kvbm bench --local remote` (2026-11-30, load 2.2) 0.61 of the path's 1.46 s were that
copy. ``read_then_copy_gbps`` is the raw pipeline of that work done one after the other,
no overlap: the raw READ's rate, then ``engine.copy_in`` of the same blocks from the
buffers the READ filled (best of ``repeats``). The table shows it beside the raw READ,
which stays the row's limit (the goal is stated against it). The path can beat this
figure (a tier may overlap its READs with the copy); it is a pairing, not a ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def read_then_copy_gbps(read_gbps: float, engine: Any, bufs: Sequence[np.ndarray], max_blocks: int,
                        repeats: int = 3) -> float:
    """GB/s of a raw READ at ``read_gbps`` followed by copying ``bufs`` (whole blocks)
    into the engine's first blocks, serially; 0 when nothing can be timed."""
    n = min(len(bufs), max_blocks)
    if n == 0 or read_gbps <= 0:
        return 0.0
    nbytes = sum(b.nbytes for b in bufs[:n])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.copy_in(list(range(n)), list(bufs[:n]))
        best = min(best, time.perf_counter() - t0)
    if best <= 0:
        return 0.0
    return nbytes / (nbytes / (read_gbps * 1e9) + best) / 1e9


class RemoteSamples:
    """The raw READ sampled through the workload, as the memory limit is (``mempair``).

    Measured once after the workload, the raw READ ran on a machine in another state
    than the path's reads (in one niced run the end sample was 2.80 GB/s where the
    locked runs' were 5.8-6.3). Here each remote tier's raw READ (``limits.
    remote_raw_read_gbps`` of the last 64 blocks the bench read from that peer) is
    sampled every 8 turns and at the end; the path's figure in each window is divided
    by the better of the samples around it (``MemPairs``), the ratio is the median of
    the windows'. Before the first block read from a peer nothing is READ (that READ
    would set up the connection the path's first read pays, a wait a user sees: in
    one run it took the first onboard's 260-460 ms p99 to 105 ms); the first window
    is paired with the sample after it. A sample that fails is skipped."""

    def __init__(self, tiers: dict[str, Any], block_bytes: int, blocks: int = 64) -> None:
        from kvbm.layout import aligned_empty

        from .mempair import MemPairs

        self.tiers = tiers
        self.blocks = blocks
        self.pairs = {name: MemPairs() for name in tiers}
        self._bufs = [aligned_empty(block_bytes) for _ in range(blocks)] if tiers else []

    def sample(self, keys: dict[str, list[bytes]], paths: dict[str, dict[str, Any]]) -> float:
        """Sample each tier's raw READ now; returns the seconds it took (not the workload's)."""
        from .limits import remote_raw_read_gbps

        t0 = time.perf_counter()
        for name, tier in self.tiers.items():
            ks = list(keys.get(name) or [])[-self.blocks:]
            gbps = 0.0  # no READ yet: the counters only, the next sample is the window's
            if ks:
                try:
                    gbps = remote_raw_read_gbps(tier, ks, self._bufs[: len(ks)])
                except Exception:  # the windows around it merge
                    continue
            elif self.pairs[name].samples:
                continue
            self.pairs[name].sample(gbps, paths)
        return time.perf_counter() - t0

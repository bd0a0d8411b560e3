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

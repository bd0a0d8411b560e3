"""Physical limits measured in the same run, as denominators of each figure's ratio."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def memcpy_gbps(nbytes: int = 256 * 2**20, threads: int = 1, repeats: int = 5) -> float:
    """Best-of-``repeats`` GB/s of copying ``nbytes`` between two touched buffers.

    With ``threads`` > 1 the buffer is split into that many slices copied in
    parallel (``np.copyto`` releases the GIL), the way the host tier copies a batch.
    """
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    step = -(-nbytes // threads)
    parts = [(dst[i : i + step], src[i : i + step]) for i in range(0, nbytes, step)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            if threads == 1:
                np.copyto(dst, src)
            else:
                list(pool.map(lambda p: np.copyto(p[0], p[1]), parts))
            best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9

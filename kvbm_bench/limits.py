"""Physical limits measured in the same run, as denominators of each figure's ratio."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` timings of ``fn()``, in seconds: the least disturbed run."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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


def dd_direct_gbps(directory: str, nbytes: int = 512 * 2**20, repeats: int = 3) -> tuple[float, float]:
    """(write, read) GB/s of ``dd`` with O_DIRECT and 2 MiB blocks in ``directory``.

    The physical limit of a disk tier on that directory: one request in flight, no
    page cache. Returns (0, 0) where dd or O_DIRECT is unavailable.
    """
    import os
    import re
    import shutil
    import subprocess
    import tempfile

    if shutil.which("dd") is None:
        return 0.0, 0.0
    count = max(1, nbytes // (2 * 2**20))

    def run(args: list[str]) -> float:
        r = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
        m = re.search(r"copied, ([0-9.e+-]+) s", r.stderr)
        if m is None:
            raise RuntimeError(r.stderr)
        return float(m.group(1))

    fd, path = tempfile.mkstemp(prefix="kvbm-dd-", dir=directory)
    os.close(fd)
    try:
        w = min(run(["if=/dev/zero", f"of={path}", "bs=2M", f"count={count}", "oflag=direct",
                     "conv=notrunc"]) for _ in range(repeats))
        r = min(run([f"if={path}", "of=/dev/null", "bs=2M", f"count={count}", "iflag=direct"])
                for _ in range(repeats))
    except (subprocess.CalledProcessError, RuntimeError):
        return 0.0, 0.0
    finally:
        os.unlink(path)
    size = count * 2 * 2**20
    return size / w / 1e9, size / r / 1e9

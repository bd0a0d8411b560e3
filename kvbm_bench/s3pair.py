"""An S3 tier's offload and onboard share one server: a row for both ways together.

``raw boto3 put`` and ``get`` are each measured alone on a quiet server, but during the
workload the cascade's uploads (16 write threads) and the onboards' downloads (16 read
threads) run at the same time against the same server: in `kvbm bench --local s3`
(2026-11-30, load 1.9-2.3) both were in flight for 4.5 of the 10.0 s the server was
busy, and each path's own figure then counts the other's share of the server as its
own time (offload:s3 0.55, onboard:s3 0.46 of their raw loops). Those rows stay as
they are: an onboard does wait behind the uploads on the same server, a user sees it.

The row this module adds judges the tier on the server as a whole: every byte moved
both ways over the time any S3 transfer of the workload was running (the union of the
paths' transfer intervals, as the executor counts them), beside the time the raw
loops would take for the same bytes, put and get each at its own measured rate
(``put_bytes / raw_put + get_bytes / raw_get``). A ratio of 1 means the tier kept the
server moving as fast as raw boto3 does, one direction at a time.

Two cascade copies running at once share their time: the executor counts a path's
seconds as the union of its transfers' intervals (``PathStats``; before that, 8.9 s
summed against 8.1 s busy in that run), and this row takes the union across both
paths, so nothing is counted twice.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class PathClock:
    """The interval of each transfer on the paths of ``tiers``. An onboard's is
    (end - seconds, end) as the executor counts it. A cascade copy's is its whole call
    (``Executor.copy``), set-up included. An offload with no copy call (the S3 tier
    first in the chain) falls back to the counted interval."""

    def __init__(self, executor: Any, tiers: list[str]) -> None:
        self.paths = {f"{op}:{t}" for t in tiers for op in ("offload", "onboard")}
        self.intervals: dict[str, list[tuple[float, float]]] = {p: [] for p in self.paths}
        self._counted: dict[str, list[tuple[float, float]]] = {p: [] for p in self.paths}
        self._lock = threading.Lock()
        count_fn, copy_fn = executor.count, executor.copy

        def count(path: str, blocks: int, seconds: float, failures: int = 0) -> None:
            if path in self.paths and blocks:
                end = time.perf_counter()
                with self._lock:
                    self._counted[path].append((end - seconds, end))
            count_fn(path, blocks, seconds, failures)

        def copy(op: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return copy_fn(op)
            finally:
                path = f"offload:{executor.tiers[op.dst_tier].name}"
                if path in self.paths:
                    t1 = time.perf_counter()
                    with self._lock:
                        self.intervals[path].append((t0, t1))

        executor.count, executor.copy = count, copy  # this manager's executor only

    def _of(self, path: str) -> list[tuple[float, float]]:
        if path.startswith("offload:") and self.intervals.get(path):
            return self.intervals[path]
        return self._counted.get(path, [])

    def busy(self, paths: list[str]) -> float:
        """Seconds during which at least one transfer of ``paths`` ran."""
        ivs = sorted(iv for p in paths for iv in self._of(p))
        total, end = 0.0, float("-inf")
        for s, e in ivs:
            if e > end:
                total += e - max(s, end)
                end = e
        return total


def add_rows(report: Any, clock: PathClock | None, tiers: list[str]) -> None:
    """For each S3 tier with both raw limits and traffic both ways, the row
    ``offload+onboard:{tier}[one server]`` (see the module's note)."""
    if clock is None:
        return
    for t in tiers:
        off, on = report.paths.get(f"offload:{t}"), report.paths.get(f"onboard:{t}")
        put, get = report.limits.get(f"boto3_put:{t}"), report.limits.get(f"boto3_get:{t}")
        if not (off and on and put and get and off["bytes"] and on["bytes"]):
            continue
        busy = clock.busy([f"offload:{t}", f"onboard:{t}"])
        raw_s = off["bytes"] / (put * 1e9) + on["bytes"] / (get * 1e9)
        nbytes = off["bytes"] + on["bytes"]
        report.paths[f"offload+onboard:{t}[one server]"] = {
            "blocks": off["blocks"] + on["blocks"], "bytes": nbytes, "seconds": busy,
            "gbps": nbytes / busy / 1e9 if busy else 0.0, "failures": off["failures"] + on["failures"],
            "limit_gbps": nbytes / raw_s / 1e9,
            "limit": "raw boto3 put, get alone at their rates, same bytes",
            "offload_busy_s": clock.busy([f"offload:{t}"]),
        }

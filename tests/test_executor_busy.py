"""A path's seconds are the time it was busy: transfers of one path that run at once
(two cascade copies into one disk, say) count their shared time once, so its GB/s is
the path's throughput, comparable with fio's or raw boto3's over several jobs."""

from __future__ import annotations

import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from kvbm import KvBlockManager
from kvbm.pathstats import PathStats

from conftest import PAGE, SMALL_MODEL


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), min_size=1, max_size=40))
def test_busy_seconds_are_the_union_of_the_transfers_intervals(raw: list[tuple[int, int]]) -> None:
    # Transfers are counted when they end, so ends arrive in order; starts do not.
    ends = sorted(e for e, _ in raw)
    intervals = [(float(e - d), float(e)) for e, (_, d) in zip(ends, raw)]
    p = PathStats()
    for s, e in intervals:
        p.add(s, e)
    assert p.seconds == _union(intervals)
    assert p.call_seconds == sum(e - s for s, e in intervals)


def test_two_transfers_that_ran_at_once_count_their_time_once() -> None:
    p = PathStats(bytes=2 * 10**9)
    p.add(10.0, 12.0)
    p.add(10.5, 12.5)
    assert p.seconds == 2.5  # summed durations would say 4.0
    assert p.call_seconds == 4.0
    assert p.gbps == 2 * 10**9 / 2.5 / 1e9


def test_transfers_apart_in_time_add_their_durations() -> None:
    p = PathStats()
    p.add(1.0, 2.0)
    p.add(3.0, 3.5)
    assert p.seconds == 1.5


def test_executor_counts_concurrent_transfers_of_a_path_as_its_busy_time() -> None:
    with KvBlockManager.from_config({"model": SMALL_MODEL, "page_size": PAGE,
                                     "tiers": [{"type": "host", "num_blocks": 4}]}) as mgr:
        ex = mgr.executor
        start = threading.Barrier(2)

        def transfer() -> None:  # two transfers of 0.2 s that ran side by side
            start.wait()
            t0 = time.perf_counter()
            time.sleep(0.2)
            ex.count("offload:x", 1, time.perf_counter() - t0)

        threads = [threading.Thread(target=transfer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = ex.stats()["paths"]["offload:x"]
    assert 0.2 <= got["seconds"] < 0.3  # their union, not 0.4
    assert got["call_seconds"] >= 0.4
    assert got["gbps"] == got["bytes"] / got["seconds"] / 1e9

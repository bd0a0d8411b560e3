"""``kvbm_bench.s3pair``: the S3 tier's busy time is the union of its transfers'
intervals (overlapping copies counted once), on a real manager's executor."""

from __future__ import annotations

from kvbm.manager import KvBlockManager
from kvbm_bench.s3pair import PathClock

TINY = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16"}


def _clock() -> tuple[KvBlockManager, PathClock]:
    mgr = KvBlockManager.from_config({"model": TINY, "page_size": 16,
                                      "tiers": [{"type": "host", "num_blocks": 4}]})
    return mgr, PathClock(mgr.executor, ["s"])


def test_overlapping_transfers_count_once_in_busy_time() -> None:
    mgr, clock = _clock()
    with mgr:
        mgr.executor.count("onboard:s", 1, 2.0)  # counted at t: (t-2, t)
        mgr.executor.count("onboard:s", 1, 1.0)  # (t'-1, t'), inside the first
        busy = clock.busy(["onboard:s"])
    assert 1.99 < busy < 2.1  # a sum would be 3.0


def test_counts_still_reach_the_executor_and_other_paths_are_not_timed() -> None:
    mgr, clock = _clock()
    with mgr:
        mgr.executor.count("onboard:s", 3, 0.5)
        mgr.executor.count("onboard:host", 2, 0.5)
        paths = mgr.executor.paths
        assert (paths["onboard:s"].blocks, paths["onboard:host"].blocks) == (3, 2)
    assert clock.busy(["onboard:host"]) == 0.0

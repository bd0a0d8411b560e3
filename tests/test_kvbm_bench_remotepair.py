"""A remote tier's raw READ sampled through the workload (``kvbm_bench.remotepair.
RemoteSamples``): each window's onboard:remote figure is paired with the samples around
it, nothing is READ before the path's first read from the peer, a failed sample is
skipped, and the end-of-run READ is still shown."""

from __future__ import annotations

from typing import Any

from kvbm_bench.remotepair import RemoteSamples
from kvbm_bench.runner import BenchReport, _attach_limits

GB = 10**9


def counters(gb: float, seconds: float) -> dict[str, dict[str, Any]]:
    """The executor's path counters with onboard:remote at ``gb`` GB in ``seconds``."""
    return {"onboard:remote": {"blocks": int(gb * 500), "bytes": int(gb * GB), "seconds": seconds}}


def test_nothing_is_read_before_the_first_block_from_the_peer() -> None:
    rs = RemoteSamples({"remote": object()}, 4096)  # a READ through it would raise
    assert rs.sample({"remote": []}, counters(0, 0.0)) >= 0
    assert [g for g, _ in rs.pairs["remote"].samples] == [0.0], "the counters only, no READ"
    rs.sample({"remote": []}, counters(0, 0.0))
    assert len(rs.pairs["remote"].samples) == 1, "a second empty sample adds nothing"
    rs.sample({"remote": [b"k" * 16]}, counters(1, 0.5))  # its READ fails: skipped
    assert len(rs.pairs["remote"].samples) == 1


def report_with(rs: RemoteSamples | None) -> BenchReport:
    r = BenchReport(chain=["host:host", "remote:remote"], block_bytes=2 << 20)
    r.paths["onboard:remote"] = {"blocks": 1500, "bytes": 3 * GB, "seconds": 1.5, "gbps": 2.0}
    r.limits.update({"nixl_read:remote": 6.0, "nixl_read_copy:remote": 4.0})
    r.remote_samples = rs
    return r


def test_each_window_is_divided_by_the_better_raw_read_around_it() -> None:
    rs = RemoteSamples({"remote": object()}, 4096)
    pairs = rs.pairs["remote"]
    pairs.sample(0.0, counters(0, 0.0))  # before the first read: counters only
    pairs.sample(4.0, counters(1, 1.0))  # window 1: 1 GB/s against 4 (its only sample)
    pairs.sample(5.0, counters(4, 2.0))  # window 2: 3 GB/s against max(4, 5)
    r = report_with(rs)
    _attach_limits(r, {"remote": "remote"})
    p = r.paths["onboard:remote"]
    assert p["pair_ratios"] == [0.25, 0.6] and abs(p["ratio"] - 0.425) < 1e-9
    assert p["end_limit_gbps"] == 6.0 and "at the end 6.00, ratio 0.33" in p["limit"]
    assert "then the engine copy 4.00, ratio 0.50" in p["limit"]
    # The control: with no samples the row is the end-of-run READ, as before.
    plain = report_with(None)
    _attach_limits(plain, {"remote": "remote"})
    assert plain.paths["onboard:remote"]["ratio"] == 2.0 / 6.0
    assert "end_limit_gbps" not in plain.paths["onboard:remote"]

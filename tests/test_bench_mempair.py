"""``kvbm bench``'s memory paths paired window by window with the limit samples around
them (``kvbm_bench.mempair``): each window's figure over the better of the samples
right before and after it, the path's ratio the median of its windows."""

from __future__ import annotations

from typing import Any

import pytest

from kvbm_bench.mempair import MIN_BLOCKS, MemPairs

MIB2 = 2 * 2**20


def paths(blocks: int, seconds: float) -> dict[str, dict[str, Any]]:
    return {"offload:host": {"blocks": blocks, "bytes": blocks * MIB2, "seconds": seconds}}


def test_a_window_is_divided_by_the_better_sample_around_it() -> None:
    mp = MemPairs()
    mp.sample(10.0, paths(0, 0.0))
    mp.sample(20.0, paths(100, 0.02))  # 100 blocks of 2 MiB in 20 ms: 10.49 GB/s
    mp.sample(5.0, paths(200, 0.05))   # 100 more in 30 ms: 6.99 GB/s
    got = [(round(x.gbps, 2), x.limit_gbps) for x in mp.pairs["offload:host"]]
    assert got == [(10.49, 20.0), (6.99, 20.0)]


def test_a_window_with_fewer_than_the_minimum_blocks_gives_no_pair() -> None:
    mp = MemPairs()
    mp.sample(10.0, paths(0, 0.0))
    mp.sample(10.0, paths(MIN_BLOCKS - 1, 0.01))
    mp.sample(10.0, paths(2 * MIN_BLOCKS - 1, 0.02))
    assert [round(x.gbps, 3) for x in mp.pairs["offload:host"]] == [
        round(MIN_BLOCKS * MIB2 / 0.01 / 1e9, 3)]


def test_the_path_ratio_is_the_median_of_its_windows() -> None:
    mp = MemPairs()
    mp.sample(10.0, paths(0, 0.0))
    for secs in (0.1, 0.2, 0.4):
        prev = mp.samples[-1][1]["offload:host"]
        mp.sample(10.0, paths(prev[0] + 100, prev[2] + secs))
    p: dict[str, Any] = {"gbps": 1.0}
    assert mp.attach("offload:host", p, "memcpy")
    assert p["pair_ratios"] == pytest.approx([100 * MIB2 / s / 1e10 for s in (0.1, 0.2, 0.4)])
    assert p["ratio"] == pytest.approx(100 * MIB2 / 0.2 / 1e10)
    assert "paired around 3 windows" in p["limit"]
    assert not mp.attach("onboard:host", {}, "memcpy"), "no pairs: the caller's median stays"

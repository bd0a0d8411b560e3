"""``kvbm bench``'s disk limit paired around the workload's parts (``diskpair``): each
part's figure against the fio samples right before and after it, the write limit
weighed by the writes into never-written space, the ratio the median of the pairs.
fio itself is replaced by a list of samples here (the CLI test runs the real one)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvbm_bench import diskpair
from kvbm_bench.diskpair import MIN_BLOCKS, DiskPairs, FioSample

BB = 2 * 2**20


class Recorder:
    """A DiskPairs over one tier 'disk' whose fio samples come from a list, and the
    manager's counters it reads at each boundary, kept as the workload would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, samples: list[FioSample | None]) -> None:
        it = iter(samples)
        monkeypatch.setattr(diskpair, "fio_sample", lambda *a: next(it))
        self.pairs = DiskPairs("fio", {"disk": ("/nowhere", 8)}, 2**29, BB)
        self.paths: dict[str, dict[str, Any]] = {}
        self.fresh = 0

    def move(self, path: str, blocks: int, seconds: float, fresh: int = 0) -> None:
        p = self.paths.setdefault(path, {"blocks": 0, "bytes": 0, "seconds": 0.0})
        p["blocks"] += blocks
        p["bytes"] += blocks * BB
        p["seconds"] += seconds
        self.fresh += fresh

    def boundary(self) -> None:
        self.pairs.boundary(self.paths, {"disk": {"fresh_writes": self.fresh}})


def gb(blocks: int, seconds: float) -> float:
    return blocks * BB / seconds / 1e9


def test_each_part_is_divided_by_the_better_fio_sample_right_around_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = [FioSample(1.0, 1.0, 1.0), FioSample(3.0, 3.0, 2.0), FioSample(2.0, 2.0, 4.0)]
    r = Recorder(monkeypatch, s)
    r.boundary()
    r.move("offload:disk", 100, 0.5)
    r.move("onboard:disk", 50, 0.25)
    r.boundary()
    r.move("offload:disk", 200, 2.0)
    r.move("onboard:disk", 50, 1.0)
    r.boundary()
    off = r.pairs.pairs["offload:disk"]
    assert [x.limit_gbps for x in off] == [3.0, 3.0]  # max(1, 3) then max(3, 2)
    assert [x.gbps for x in off] == pytest.approx([gb(100, 0.5), gb(200, 2.0)])
    assert [x.limit_gbps for x in r.pairs.pairs["onboard:disk"]] == [2.0, 4.0]  # reads


def test_the_paths_ratio_is_the_median_of_its_pairs_not_its_total_over_the_median_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = [FioSample(1.0, 1.0, 1.0), FioSample(1.0, 1.0, 1.0), FioSample(4.0, 4.0, 4.0),
         FioSample(4.0, 4.0, 4.0)]
    r = Recorder(monkeypatch, s)
    r.boundary()
    for secs in (2.0, 1.0, 0.5):  # limits 1, 4, 4: pair ratios g/2, g/4, g/2
        r.move("offload:disk", 1000, secs)
        r.boundary()
    p: dict[str, Any] = {}
    assert r.pairs.attach("offload:disk", p, "write", 8)
    g = gb(1000, 1.0)
    assert p["ratio"] == pytest.approx(g / 2)
    # Not the whole run over the median limit (g 3/3.5 / 4), nor medians over medians (g / 4).
    assert p["ratio"] != pytest.approx(gb(3000, 3.5) / 4) and p["ratio"] != pytest.approx(g / 4)
    assert p["limit"].startswith("fio write O_DIRECT 2MiB x8 jobs paired around 3 parts")


def test_a_part_of_too_few_blocks_gives_no_pair_and_a_failed_sample_breaks_its_pairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok = FioSample(2.0, 2.0, 2.0)
    r = Recorder(monkeypatch, [ok, ok, None, ok])
    r.boundary()
    r.move("offload:disk", MIN_BLOCKS - 1, 0.1)  # a latency, not a rate
    r.boundary()
    r.move("offload:disk", 100, 0.1)  # fio fails after it: no limit to pair with
    r.boundary()
    r.move("offload:disk", 100, 0.1)  # no sample before it
    r.boundary()
    assert "offload:disk" not in r.pairs.pairs
    assert not r.pairs.attach("offload:disk", {}, "write", 8)
    assert r.pairs.limits()["fio_samples:disk"] == 3


def test_a_parts_write_limit_weighs_fios_first_write_by_the_tiers_fresh_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = [FioSample(1.0, 2.0, 1.0)] * 3
    r = Recorder(monkeypatch, s)
    r.boundary()
    r.move("offload:disk", 100, 1.0, fresh=100)  # all into new space
    r.boundary()
    r.move("offload:disk", 100, 1.0, fresh=50)  # half
    r.boundary()
    assert [x.limit_gbps for x in r.pairs.pairs["offload:disk"]] == pytest.approx([1.0, 4 / 3])
    assert [x.fresh_fraction for x in r.pairs.pairs["offload:disk"]] == [1.0, 0.5]


@given(fresh=st.floats(0.1, 10), over=st.floats(0.1, 10), n=st.integers(1, 1000),
       k=st.integers(0, 1000))
def test_the_weighed_write_limit_lies_between_fios_two_writes(
    fresh: float, over: float, n: int, k: int,
) -> None:
    lim = FioSample(fresh, over, 1.0).write_limit(n * BB, min(k, n) * BB)
    assert min(fresh, over) * (1 - 1e-9) <= lim <= max(fresh, over) * (1 + 1e-9)
    if k == 0:
        assert lim == pytest.approx(over)
    if k >= n:
        assert lim == pytest.approx(fresh)

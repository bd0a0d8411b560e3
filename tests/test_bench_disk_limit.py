"""The disk limit is the better of fio at iodepth 1 (psync) and at the disk tier's
in-flight depth (libaio), in ``bench/disk.py`` and in ``kvbm bench``'s fio samples alike
(issue 14 item 5): a tier that keeps several requests in flight per thread is not held
to one-request fio. Where fio has no libaio, psync alone, and the tables say so."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvbm_bench import diskpair, limits
from kvbm_bench.diskpair import DiskPairs, FioSample

ROOT = Path(__file__).resolve().parent.parent
BB = 2 * 2**20
# GB/s a fake fio reports: libaio iodepth 3 writes faster, psync reads faster here.
FAKE = {(1, "write"): 2.0, (3, "write"): 3.0, (1, "read"): 4.0, (3, "read"): 1.5}


def _bench_disk() -> Any:
    spec = importlib.util.spec_from_file_location("bench_disk", ROOT / "bench" / "disk.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_fio(calls: list[tuple[str, int, int]]) -> Any:
    def run(fio: str, work: str, rw: str, jobs: int, per_job: int, name: str = "x",
            depth: int = 1) -> float:
        calls.append((rw, depth, per_job))
        return FAKE[(depth, rw)]
    return run


def test_a_kvbm_bench_fio_sample_is_the_better_of_iodepth_1_and_the_tiers_depth(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(diskpair, "fio_run", fake_fio(calls))
    monkeypatch.setattr(diskpair, "fio_depths", lambda fio, d: (1, 3))
    s = diskpair.fio_sample("fio", str(tmp_path), 8, 64 * BB)
    assert s is not None
    assert (s.write_fresh, s.write_over, s.read) == (3.0, 3.0, 4.0)  # not psync's 2, 2, 4
    assert s.depths == {1: (2.0, 2.0, 4.0), 3: (3.0, 3.0, 1.5)}
    # Each depth moves half the bytes: the sample takes about as long as one depth did.
    assert {c[2] for c in calls} == {64 * BB // 2 // 8} and len(calls) == 6
    assert list(tmp_path.iterdir()) == []


def test_kvbm_bench_names_both_depths_and_keeps_each_depths_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = FioSample(3.0, 3.0, 4.0, {1: (2.0, 2.0, 4.0), 3: (3.0, 3.0, 1.5)})
    it = iter([s, s])
    monkeypatch.setattr(diskpair, "fio_sample", lambda *a: next(it))
    pairs = DiskPairs("fio", {"disk": ("/nowhere", 8)}, 2**29, BB)
    pairs.boundary({}, {})
    pairs.boundary({"offload:disk": {"blocks": 100, "bytes": 100 * BB, "seconds": 0.1}}, {})
    p: dict[str, Any] = {}
    assert pairs.attach("offload:disk", p, "write", 8)
    assert p["limit_gbps"] == 3.0
    assert "best of psync iodepth 1 and libaio iodepth 3" in p["limit"]
    lim = pairs.limits()
    assert (lim["fio_write_qd1:disk"], lim["fio_write_qd3:disk"], lim["fio_read_qd3:disk"]) == (
        2.0, 3.0, 1.5)


def test_fio_gbps_is_the_better_depth_for_write_and_for_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(limits, "fio_run", fake_fio(calls))
    monkeypatch.setattr(limits, "fio_depths", lambda fio, d: (1, 3))
    assert limits.fio_gbps(str(tmp_path), 8, 64 * BB, repeats=1, fio="fio") == (3.0, 4.0)
    assert {c[1] for c in calls} == {1, 3}


def test_bench_disk_pairs_take_the_best_depth_on_either_side_of_the_path() -> None:
    fio_pair = _bench_disk().fio_pair
    assert fio_pair({1: 2.0, 3: 3.0}, {3: 2.5, 1: 2.2}) == (3.0, pytest.approx(3.0 / 2.5))
    assert fio_pair({1: 2.0, 3: 1.0}, {3: 2.5, 1: 2.2})[0] == 2.5  # after, libaio
    assert fio_pair({1: 2.0}, {1: 4.0}) == (4.0, 0.5)  # psync alone


def test_without_libaio_the_limit_is_psync_alone_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    def run(fio: str, work: str, rw: str, jobs: int, per_job: int, name: str = "x",
            depth: int = 1) -> float:
        if depth > 1:
            raise RuntimeError("fio: engine libaio not loadable")
        return 1.0

    monkeypatch.setattr(limits, "fio_run", run)
    assert limits.fio_depths("no-aio-fio", str(tmp_path)) == (1,)
    assert limits.fio_depth_name((1,)) == "psync iodepth 1 alone (fio has no libaio here)"
    assert limits.fio_depth_name(limits.FIO_DEPTHS) == "best of psync iodepth 1 and libaio iodepth 3"
    assert list(tmp_path.iterdir()) == []


def test_real_fio_runs_libaio_at_the_tiers_depth(tmp_path: Path) -> None:
    fio = limits.find_fio()
    if fio is None:
        pytest.skip("no fio here (make fio)")
    assert limits.fio_depths(fio, str(tmp_path)) == limits.FIO_DEPTHS
    assert limits.fio_run(fio, str(tmp_path), "write", 2, 2 * BB, "t", depth=3) > 0
    assert limits.fio_run(fio, str(tmp_path), "read", 2, 2 * BB, "t", depth=3) > 0


def test_bench_disk_prints_both_depths_and_the_limit_is_at_least_each(tmp_path: Path) -> None:
    if limits.find_fio() is None:
        pytest.skip("no fio here (make fio)")
    cmd = [sys.executable, str(ROOT / "bench" / "disk.py"), "--dir", str(tmp_path), "--gib",
           "0.02", "--repeats", "1", "--paths", "tier", "--pages", "2m", "--rebuild-blocks", "8"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "best of psync iodepth 1 and libaio iodepth 3" in text
    assert "fio psync iodepth 1 (median of its pairs)" in text
    assert "fio libaio iodepth 3 (median of its pairs)" in text
    res = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True,
                                    check=True, cwd=ROOT).stdout)
    assert res["fio_depths"] == [1, 3]
    for rw in ("write", "read"):
        for gbps in res[f"fio_depth_{rw}_gbps"].values():
            assert gbps <= res[f"limit_{rw}_gbps"] * (1 + 1e-9)
    assert list(tmp_path.iterdir()) == []

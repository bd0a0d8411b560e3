"""``kvbm bench``: every path beside its own limit, progress from the first second, a
results folder, the block-size label, and a run without torch. Tiny sizes throughout:
a 4 KiB block, a few turns, fio and dd moving a few MiB."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm.cli import main
from kvbm.layout import BlockLayout, ModelSpec
from kvbm_bench import limits
from kvbm_bench.engine_np import NumpyEngineBlocks
from kvbm_bench.progress import Progress
from kvbm_bench.results import write_results
from kvbm_bench.runner import BenchReport, _attach_limits, _count_only_uploaded, block_label

# 2 layers x K/V x page 16 x 2 heads x 16 x fp16 = 4 KiB per block.
MODEL = "{name: tiny, num_layers: 2, num_kv_heads: 2, head_dim: 16, dtype: float16}"
ARGS = ["--users", "2", "--rounds", "2", "--system-tokens", "64", "--duration", "20",
        "--raw-blocks", "8", "--limit-mib", "4"]


class TimedStream(io.StringIO):
    """stderr that remembers when each line was written."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def write(self, s: str) -> int:
        with self.lock:
            for line in s.splitlines():
                if line.strip():
                    self.lines.append((time.perf_counter(), line))
        return super().write(s)


def _chain(tmp: Path, *tiers: str) -> Path:
    p = tmp / "chain.yaml"
    p.write_text(f"model: {MODEL}\npage_size: 16\ntiers:\n" + "".join(f"  - {t}\n" for t in tiers))
    return p


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One CLI run of a host+disk chain: its timed stderr, stdout and results folder."""
    tmp = tmp_path_factory.mktemp("bench")
    # A host tier smaller than one prompt: the second round's prefixes come from disk.
    cfg = _chain(tmp, "{type: host, num_blocks: 16}",
                 f"{{type: disk, num_blocks: 256, path: '{tmp / 'disk'}', io_threads: 2, admission: all}}")
    err, out = TimedStream(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["bench", "--config", str(cfg), "--out", str(tmp / "out"), *ARGS])
    yield {"rc": rc, "t0": t0, "err": err.lines, "out": out.getvalue(), "dir": tmp / "out"}


def test_the_first_progress_line_with_an_eta_comes_within_a_second(disk_run: dict[str, Any]) -> None:
    first = next((t, line) for t, line in disk_run["err"] if "ETA" in line)
    assert first[0] - disk_run["t0"] < 1.0, first


def test_every_phase_reports_progress_with_an_eta_limits_included(disk_run: dict[str, Any]) -> None:
    seen = {p for _, line in disk_run["err"] if "ETA" in line
            for p in ("setup", "workload", "contiguous", "limits") if f" {p} " in line}
    assert seen == {"setup", "workload", "contiguous", "limits"}
    assert disk_run["err"][-1][1].startswith("kvbm bench: done in ")


def test_a_slow_chain_build_still_shows_progress_in_the_first_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kvbm_bench.runner

    built: list[float] = []
    real = kvbm_bench.runner.KvBlockManager.from_config

    def slow(config: Any) -> Any:  # a chain whose build takes 2.5 s (a large arena, a bucket check)
        time.sleep(2.5)
        built.append(time.perf_counter())
        return real(config)

    monkeypatch.setattr(kvbm_bench.runner.KvBlockManager, "from_config", slow)
    err = TimedStream()
    cfg = _chain(tmp_path, "{type: host, num_blocks: 16}")
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["bench", "--config", str(cfg), "--no-out", *ARGS]) == 0
    shown = [t for t, line in err.lines if "ETA" in line and t < built[0]]
    assert shown and shown[0] - t0 < 1.0, err.lines[:5]
    assert len(shown) >= 2  # and its clock moves while the chain is built


def test_a_phase_between_steps_still_redraws_its_clock() -> None:
    s = TimedStream()
    bar = Progress(["slow"], True, stream=s, interval=0.1)
    bar.phase("slow", 3)
    time.sleep(1.0)  # no step: only the ticker draws
    bar.close()
    assert len(s.lines) >= 3, s.lines


def test_results_folder_has_json_csv_and_png(disk_run: dict[str, Any]) -> None:
    assert disk_run["rc"] == 0
    d: Path = disk_run["dir"]
    report = json.loads((d / "report.json").read_text())
    with (d / "paths.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(report["paths"])
    assert (d / "paths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"results: {d}/ (report.json, paths.csv, paths.png" in disk_run["out"]


def test_results_without_matplotlib_skip_the_plots_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    written = write_results({"chain": ["host:host"], "paths": {}}, tmp_path)
    assert written == ["report.json", "paths.csv",
                       "plots skipped: matplotlib is not installed (pip install 'kvbm[plot]')"]
    assert not list(tmp_path.glob("*.png"))


def test_contiguous_label_follows_the_block_size(disk_run: dict[str, Any]) -> None:
    report = json.loads((disk_run["dir"] / "report.json").read_text())
    assert report["block_bytes"] == 4096
    assert {"offload:host[4KiB-contiguous]", "onboard:host[4KiB-contiguous]"} <= set(report["paths"])
    assert not any("2MiB" in p for p in report["paths"])


@pytest.mark.parametrize("nbytes,label", [(2 * 2**20, "2MiB"), (4096, "4KiB"), (160 * 1024, "160KiB"),
                                          (3 * 2**20 // 2, "1536KiB"), (2**20 + 512, "1.00MiB"),
                                          (1000, "1000B")])
def test_block_label(nbytes: int, label: str) -> None:
    assert block_label(nbytes) == label


def test_memory_paths_are_measured_against_the_best_of_one_and_n_thread_copies(
    disk_run: dict[str, Any],
) -> None:
    report = json.loads((disk_run["dir"] / "report.json").read_text())
    lim = report["limits"]
    assert lim["memcpy_1t_gbps"] > 0 and lim["memcpy_nt_gbps"] > 0
    n = int(lim["memcpy_threads"])
    for name in ("offload:host", "onboard:host", "offload:host[4KiB-contiguous]"):
        p = report["paths"][name]
        assert p["limit"].startswith(f"memcpy best of 1/{n} threads"), p
        if "pair_ratios" in p:  # the workload's windows, each over the samples around it
            assert p["pair_ratios"] == pytest.approx(
                [g / lim for g, lim in zip(p["pair_gbps"], p["pair_limits_gbps"], strict=True)])
            assert p["ratio"] == pytest.approx(statistics.median(p["pair_ratios"]))
        else:
            assert p["ratio"] == pytest.approx(p["gbps"] / p["limit_gbps"])


def test_memcpy_limit_is_the_faster_of_one_and_n_threads() -> None:
    assert limits.MemcpyLimit(3.0, 5.0, 4).best_gbps == 5.0
    assert limits.MemcpyLimit(7.0, 5.0, 4).best_gbps == 7.0
    assert limits.MemcpyLimit(7.0, 5.0, 4).name == "memcpy best of 1/4 threads (1 won)"


def test_disk_paths_are_measured_against_fio_with_the_tiers_threads_and_dd_beside(
    disk_run: dict[str, Any],
) -> None:
    if limits.find_fio() is None:
        pytest.skip("no fio here (make fio)")
    report = json.loads((disk_run["dir"] / "report.json").read_text())
    lim = report["limits"]
    # fio before the first turn, between the 4 parts of the 4 turns and after the last.
    assert lim["fio_samples:disk"] == 5 and lim["fio_jobs:disk"] == 2
    assert lim["fio_write_fresh:disk"] > 0 and lim["fio_write:disk"] > 0 and lim["fio_read:disk"] > 0
    for name, rw in (("offload:disk", "write"), ("onboard:disk", "read")):
        p = report["paths"][name]
        k = len(p["pair_ratios"])
        assert p["limit"].startswith(f"fio {rw} O_DIRECT 2MiB x2 jobs paired around {k} parts"), p
        assert 1 <= k <= 4
        assert p["ratio"] == pytest.approx(float(np.median(p["pair_ratios"])))
        assert p["pair_ratios"] == pytest.approx(
            [g / li for g, li in zip(p["pair_gbps"], p["pair_limits_gbps"], strict=True)])
        assert p["dd_gbps"] == report["limits"][f"dd_{rw}:disk"] > 0
        assert p["limit"].endswith(f"(dd {p['dd_gbps']:.2f})")
    # A new tier writes only into never-written space: the write limit is fio's first write.
    assert report["paths"]["offload:disk"]["fresh_fraction"] == 1.0


def test_without_fio_the_disk_limit_is_dd_and_the_table_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import kvbm_bench.runner

    monkeypatch.setattr(kvbm_bench.runner, "find_fio", lambda: None)
    cfg = _chain(tmp_path, "{type: host, num_blocks: 16}",
                 f"{{type: disk, num_blocks: 64, path: '{tmp_path / 'disk'}', io_threads: 2}}")
    assert main(["bench", "--config", str(cfg), "--no-out", "--no-progress", "--json", *ARGS]) == 0
    report = json.loads(capsys.readouterr().out)
    p = report["paths"]["offload:disk"]
    assert p["limit"] == "dd write O_DIRECT 2MiB (no fio (run `make fio`): dd is the limit)"
    assert p["limit_gbps"] == report["limits"]["dd_write:disk"] > 0


def test_fio_measures_write_and_read_with_direct_io(tmp_path: Path) -> None:
    if limits.find_fio() is None:
        pytest.skip("no fio here (make fio)")
    got = limits.fio_gbps(str(tmp_path), 2, 4 * 2**20, repeats=1)
    assert got is not None and got[0] > 0 and got[1] > 0
    assert list(tmp_path.iterdir()) == []  # its files are removed


@pytest.fixture(scope="module")
def moto() -> Iterator[Any]:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from s3server import MotoServer

    s = MotoServer()
    s.start()
    yield s
    s.stop()


def test_s3_paths_are_measured_against_raw_boto3_on_the_same_server(
    tmp_path: Path, moto: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    from s3server import ACCESS_KEY, SECRET_KEY

    cfg = _chain(tmp_path, "{type: host, num_blocks: 16}",
                 f"{{type: s3, bucket: kvbm-bench-test, create_bucket: true, endpoint_url: "
                 f"'{moto.url}', region: us-east-1, addressing_style: path, max_concurrency: 4, "
                 f"aws_access_key_id: {ACCESS_KEY}, aws_secret_access_key: {SECRET_KEY}}}")
    assert main(["bench", "--config", str(cfg), "--no-out", "--no-progress", "--json", *ARGS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mismatched_blocks"] == 0
    p = report["paths"]["offload:s3"]
    assert "skipped_bytes" not in p  # a fresh bucket: every offered byte was sent
    assert p["limit"] == "raw boto3 put x4 same server"
    assert p["limit_gbps"] == report["limits"]["boto3_put:s3"] > 0
    if "onboard:s3" in report["paths"]:
        assert report["paths"]["onboard:s3"]["limit"] == "raw boto3 get x4 same server"


def test_an_offload_to_an_object_store_counts_only_the_bytes_it_uploaded() -> None:
    # The S3 tier skips a block its server already holds (a conditional put finds it):
    # those bytes never crossed the wire and must not raise the path's GB/s.
    r = BenchReport(chain=["h:host", "s3:s3"])
    r.paths["offload:s3"] = {"blocks": 10, "bytes": 10_000, "seconds": 1e-6, "gbps": 10.0,
                             "failures": 0}
    r.paths["offload:h"] = {"blocks": 10, "bytes": 10_000, "seconds": 1e-6, "gbps": 10.0,
                            "failures": 0}
    _count_only_uploaded(r, {"h": {"blocks": 3}, "s3": {"put_bytes": 4_000, "put_exists": 6}})
    assert r.paths["offload:s3"]["bytes"] == 4_000
    assert r.paths["offload:s3"]["skipped_bytes"] == 6_000
    assert r.paths["offload:s3"]["gbps"] == pytest.approx(4.0)
    assert "already on the server" in r.limit_notes["s3"]
    assert r.paths["offload:h"]["bytes"] == 10_000  # a tier without put_bytes: as measured


def test_a_path_without_a_measured_limit_has_no_ratio_and_says_why() -> None:
    r = BenchReport(chain=["r:remote"], limit_notes={"r": "no limit: NIXL is not importable"})
    r.paths["onboard:r"] = {"blocks": 1, "bytes": 1, "seconds": 1.0, "gbps": 1.0, "failures": 0}
    _attach_limits(r, {"r": "remote"})
    assert r.paths["onboard:r"]["ratio"] is None
    assert r.paths["onboard:r"]["limit"] == "no limit (no limit: NIXL is not importable)"


def test_a_remote_read_is_measured_against_the_raw_nixl_read() -> None:
    r = BenchReport(chain=["r:remote"], limits={"nixl_read:r": 2.0})
    r.paths["onboard:r"] = {"blocks": 1, "bytes": 1, "seconds": 1.0, "gbps": 1.0, "failures": 0}
    _attach_limits(r, {"r": "remote"})
    assert (r.paths["onboard:r"]["limit"], r.paths["onboard:r"]["ratio"]) == ("raw NIXL READ, same peer", 0.5)


def test_raw_nixl_read_moves_the_peers_blocks_byte_exact(tmp_path: Path) -> None:
    pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")
    pytest.importorskip("msgpack")
    from test_remote_tier import TINY, Child, _blocks, _config

    from kvbm import KvBlockManager
    from kvbm.layout import aligned_empty

    remote = {"rendezvous_dir": str(tmp_path / "rdv")}
    child = Child(TINY, remote, n=8, seed=5).ready()
    try:
        with KvBlockManager.from_config(_config(TINY, remote)) as mgr:
            tokens, data = _blocks(8, 5, mgr.block_bytes)
            keys = mgr.hash_tokens(tokens)
            tier = mgr.chain[-1].tier
            assert all(tier.probe(keys))
            bufs = [aligned_empty(mgr.block_bytes) for _ in keys]
            assert limits.remote_raw_read_gbps(tier, keys, bufs, repeats=1) > 0
            assert all(np.array_equal(b, d) for b, d in zip(bufs, data))
    finally:
        child.kill()


def test_numpy_engine_blocks_round_trip_each_blocks_bytes() -> None:
    layout = BlockLayout(ModelSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16"), 16)
    eng = NumpyEngineBlocks(layout, 4)
    bb = layout.bytes_per_block
    blocks = [np.random.default_rng(i).integers(0, 256, bb, dtype=np.uint8) for i in range(4)]
    eng.copy_in([2, 0, 3, 1], blocks)
    got = [np.empty(bb, dtype=np.uint8) for _ in range(4)]
    eng.copy_out([2, 0, 3, 1], got)
    assert all(np.array_equal(g, b) for g, b in zip(got, blocks))
    # Engine-shaped: block 2's first layer holds the first quarter of its bytes (K of layer 0).
    assert np.array_equal(eng.layers[0][0, 2], blocks[0][: bb // 4])


NO_TORCH = """
import sys
sys.modules["torch"] = None  # as on `pip install 'kvbm[disk,s3]'`: torch cannot be imported
from kvbm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bench_runs_without_torch_on_numpy_engine_buffers(tmp_path: Path) -> None:
    cfg = _chain(tmp_path, "{type: host, num_blocks: 64}")
    r = subprocess.run([sys.executable, "-c", NO_TORCH, "bench", "--config", str(cfg), "--no-out",
                        "--no-progress", *ARGS], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert "engine buffers: numpy (torch not installed)" in r.stdout
    verified = int(r.stdout.split("verified blocks ")[1].split(",")[0])
    assert verified > 0 and "mismatched 0" in r.stdout

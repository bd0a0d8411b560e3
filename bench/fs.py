"""fs tier write/read GB/s and files/s, beside fio with the same file-per-block pattern.

In one run, on one directory:

- **fio** (the limit): ``--nrfiles`` files of exactly one tier file's size (header page
  + padded block), each created on open and written in one I/O (``--rw=write
  --create_on_open=1 --openfiles=1``), then read back in one I/O each (``--rw=read``);
  ``--direct=1`` where the tier uses O_DIRECT, ``--ioengine=psync``, ``--numjobs`` =
  the tier's ``io_threads``. GB/s and files/s from fio's own runtime.
- **python raw**: the tier's protocol with nothing else — open a temporary
  (O_DIRECT), one ``pwritev``, close, ``rename``; open, one ``preadv``, close — on the
  same number of threads: what Python's syscalls cost, without headers, checksums
  or bookkeeping.
- **FsTier**: ``write``/``read`` batches of blocks (header, xxh3 checksum written and
  verified, atime, fan-out directories); the fan-out directories exist already (a
  warm-up pass made them, as a running cache has), every pass writes new files.
- **KvBlockManager [fs]**: ``offload``/``onboard`` through a chain ``[fs]`` (adds the
  manager's staging copy) — large blocks only.
- **probe**: ``FsTier.probe`` of written keys (one ``stat`` each, waves), µs per key.

Large blocks are Llama-3-8B's KV for 16 tokens (2 MiB); small ones ``--small-kib``.
Every figure is the best of ``--repeats``; GB/s count block bytes (the header page
is moved too, by fio as by the tier, and is not counted).

Run: ``python bench/fs.py [--dir /tmp] [--gib 1] [--threads 16] [--batch 64]
[--small-kib 16] [--small-blocks 8192] [--repeats 3] [--json]``. Needs ``fio`` on
PATH for the limit (``make fio`` installs it with apt); without it the python raw
loop is the only reference and the ratios say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kvbm import BlockLayout, ContiguousBlocks, KvBlockManager, ModelSpec, Namespace
from kvbm.blockfile import padded_bytes
from kvbm.layout import aligned_empty
from kvbm.tier import TierContext
from kvbm_bench.limits import best_of
from kvbm_tiers_fs.config import FsTierConfig
from kvbm_tiers_fs.probe import O_DIRECT
from kvbm_tiers_fs.tier import FsTier

# Llama-3-8B's KV for 16 tokens: 32 layers x (K,V) x 16 x 8 heads x 128 x bf16 = 2 MiB.
LARGE = {"name": "bench-llama-3-8b", "num_layers": 32, "num_kv_heads": 8, "head_dim": 128,
         "dtype": "bfloat16"}
PAGE = 16


def small_model(kib: int) -> dict[str, Any]:
    """A model whose 16-token block is ``kib`` KiB (2 layers, 2 heads, fp16)."""
    return {"name": f"bench-small-{kib}k", "num_layers": 2, "num_kv_heads": 2,
            "head_dim": kib * 4, "dtype": "float16"}


# -- fio ----------------------------------------------------------------------------------
def fio_pass(work: Path, files: int, fsize: int, threads: int, rw: str, direct: bool) -> float:
    """Seconds fio reports (its own runtime) for one file-per-block pass."""
    per_job = max(1, files // threads)
    cmd = ["fio", "--name=kvbm", f"--directory={work}", f"--nrfiles={per_job}",
           f"--filesize={fsize}", f"--bs={fsize}", f"--rw={rw}", f"--direct={int(direct)}",
           "--ioengine=psync", f"--numjobs={threads}", "--openfiles=1", "--group_reporting",
           "--output-format=json", "--fallocate=none", "--file_service_type=sequential"]
    if rw == "write":
        cmd.append("--create_on_open=1")
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    ms = job["write" if rw == "write" else "read"]["runtime"]
    return max(ms, 1) / 1e3


def fio_limits(work: Path, files: int, fsize: int, threads: int, direct: bool,
               repeats: int) -> tuple[float, float, int]:
    """(write s, read s, files moved) for the best of ``repeats`` fio passes."""
    wt, rt = float("inf"), float("inf")
    moved = max(1, files // threads) * threads
    for r in range(repeats):
        d = work / f"fio-{r}"
        d.mkdir()
        wt = min(wt, fio_pass(d, files, fsize, threads, "write", direct))
        rt = min(rt, fio_pass(d, files, fsize, threads, "read", direct))
        shutil.rmtree(d)
    return wt, rt, moved


# -- the protocol in plain Python -------------------------------------------------------------
def python_raw(work: Path, n: int, fsize: int, threads: int, direct: bool,
               repeats: int) -> tuple[float, float]:
    """(write s, read s): temp + pwritev + close + rename, then open + preadv + close."""
    buf = aligned_empty(fsize)
    buf[:] = 7
    flag = O_DIRECT if direct else 0
    bufs = [aligned_empty(fsize) for _ in range(threads)]
    wt, rt = float("inf"), float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for r in range(repeats):
            d = work / f"raw-{r}"
            d.mkdir()
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)

            def write(i: int, dfd: int = dfd) -> None:
                tmp = f".{i}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | flag,
                             0o600, dir_fd=dfd)
                os.pwritev(fd, [buf], 0)
                os.close(fd)
                os.rename(tmp, f"{i}.kvb", src_dir_fd=dfd, dst_dir_fd=dfd)

            def read(i: int, dfd: int = dfd) -> None:
                fd = os.open(f"{i}.kvb", os.O_RDONLY | os.O_NOFOLLOW | flag, dir_fd=dfd)
                os.preadv(fd, [bufs[i % threads]], 0)
                os.close(fd)

            t0 = time.perf_counter()
            list(pool.map(write, range(n)))
            wt = min(wt, time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(pool.map(read, range(n)))
            rt = min(rt, time.perf_counter() - t0)
            os.close(dfd)
            shutil.rmtree(d)
    return wt, rt


# -- the tier -----------------------------------------------------------------------------
def make_tier(work: Path, layout: BlockLayout, model: str, threads: int) -> FsTier:
    cfg = FsTierConfig(type="fs", name="fs", path=str(work), capacity=10**15,
                       io_threads=threads, janitor=False)  # type: ignore[call-arg]
    ns = Namespace(model, layout.digest)
    return FsTier(cfg, TierContext("fs", ns, layout, 1 << 20))


def pass_keys(n: int, rep: int) -> list[bytes]:
    # The first two bytes pick the fan-out directories: the same for every pass, so
    # the directories the warm-up pass made are there, as in a running cache.
    return [(i & 0xFFFF).to_bytes(2, "little") + rep.to_bytes(2, "little") + i.to_bytes(12, "little")
            for i in range(n)]


def bench_tier(work: Path, layout: BlockLayout, model: str, n: int, batch: int, threads: int,
               repeats: int) -> dict[str, Any]:
    bb = layout.bytes_per_block
    data = aligned_empty(n * bb).reshape(n, bb)
    data.reshape(-1)[:] = np.frombuffer(np.random.default_rng(0).bytes(n * bb), np.uint8)
    src = [data[i] for i in range(n)]
    out = aligned_empty(n * bb).reshape(n, bb)
    dst = [out[i] for i in range(n)]
    tier = make_tier(work, layout, model, threads)
    reps = iter(range(1, 10**6))
    written: list[list[bytes]] = []

    def write() -> None:
        ks = pass_keys(n, next(reps))
        for i in range(0, n, batch):
            ok = tier.write(list(range(i, min(n, i + batch))), ks[i : i + batch], src[i : i + batch])
            assert all(ok), "bench write failed"
        written.append(ks)

    def read() -> None:
        ks = written[-1]
        for i in range(0, n, batch):
            ok = tier.read(list(range(i, min(n, i + batch))), ks[i : i + batch], dst[i : i + batch])
            assert all(ok), "bench read failed"

    def probe() -> None:
        ks = written[-1]
        for i in range(0, n, batch):
            assert all(tier.probe(ks[i : i + batch])), "bench probe missed"

    try:
        warm = pass_keys(n, 0)
        tier.write(list(range(n)), warm, src)  # makes the fan-out directories
        wt, rt = float("inf"), float("inf")
        for _ in range(repeats):
            wt = min(wt, best_of(write, 1))
            rt = min(rt, best_of(read, 1))
        pt = best_of(probe, repeats)
        assert np.array_equal(out[:: max(1, n // 7)], data[:: max(1, n // 7)]), "read back differs"
        st = tier.stats()
    finally:
        tier.close()
    return {"write_s": wt, "read_s": rt, "probe_us_per_key": pt / n * 1e6,
            "o_direct": st["o_direct"], "filesystem": st["filesystem"]}


def bench_manager(work: Path, n: int, batch: int, threads: int, repeats: int) -> dict[str, float]:
    layout = BlockLayout(ModelSpec(**LARGE), PAGE)  # type: ignore[arg-type]
    bb = layout.bytes_per_block
    data = np.frombuffer(np.random.default_rng(1).bytes(n * bb), np.uint8).reshape(n, bb).copy()
    out = np.zeros_like(data)
    cfg = {"model": LARGE, "page_size": PAGE, "tiers": [
        {"type": "fs", "path": str(work), "num_blocks": n, "io_threads": threads,
         "janitor": False}]}
    wt, rt = float("inf"), float("inf")
    with KvBlockManager.from_config(cfg) as m:
        src, dstb = ContiguousBlocks(data, m.layout), ContiguousBlocks(out, m.layout)
        for rep in range(repeats):
            # New keys each pass: they evict the last pass's blocks (and delete their files).
            hashes = m.hash_tokens(list(range(rep * n * PAGE, (rep + 1) * n * PAGE)))
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                r = m.offload(hashes[i : i + batch], src, range(i, min(n, i + batch)))
                assert r.stored == min(batch, n - i), f"offload stored {r.stored}"
            wt = min(wt, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                with m.match_prefix(hashes[i : i + batch]) as match:
                    got = m.onboard(match, dstb, range(i, i + match.num_blocks)).loaded
                    assert got == match.num_blocks == min(batch, n - i)
            rt = min(rt, time.perf_counter() - t0)
        assert np.array_equal(out[:: max(1, n // 7)], data[:: max(1, n // 7)])
    return {"write_gbps": n * bb / wt / 1e9, "read_gbps": n * bb / rt / 1e9}


def size_row(name: str, n: int, bb: int, ws: float, rs: float) -> dict[str, float]:
    return {"write_gbps": n * bb / ws / 1e9, "read_gbps": n * bb / rs / 1e9,
            "write_files_per_s": n / ws, "read_files_per_s": n / rs}


def run_size(base: Path, label: str, model: dict[str, Any], n: int, a: argparse.Namespace,
             has_fio: bool) -> dict[str, Any]:
    layout = BlockLayout(ModelSpec(**model), PAGE)
    bb, fb = layout.bytes_per_block, padded_bytes(layout.bytes_per_block)
    work = base / label
    work.mkdir()
    tier = bench_tier(work / "tier", layout, model["name"], n, a.batch, a.threads, a.repeats)
    direct = bool(tier["o_direct"])
    res: dict[str, Any] = {"block_bytes": bb, "file_bytes": fb, "blocks": n,
                           "o_direct": direct, "filesystem": tier["filesystem"],
                           "probe_us_per_key": tier["probe_us_per_key"]}
    res["tier"] = size_row("tier", n, bb, tier["write_s"], tier["read_s"])
    rw, rr = python_raw(work, n, fb, a.threads, direct, a.repeats)
    res["python_raw"] = size_row("raw", n, bb, rw, rr)
    if has_fio:
        fw, fr, moved = fio_limits(work, n, fb, a.threads, direct, a.repeats)
        res["fio"] = size_row("fio", moved, bb, fw, fr)
    ref = res["fio"] if has_fio else res["python_raw"]
    res["limit"] = "fio" if has_fio else "python raw loop (fio not installed)"
    for k in ("tier", "python_raw"):
        res[k]["write_ratio"] = res[k]["write_gbps"] / ref["write_gbps"]
        res[k]["read_ratio"] = res[k]["read_gbps"] / ref["read_gbps"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="directory under test")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of 2 MiB blocks per pass")
    ap.add_argument("--threads", type=int, default=16, help="fs tier io_threads = fio numjobs")
    ap.add_argument("--batch", type=int, default=64, help="blocks per write/read call")
    ap.add_argument("--small-kib", type=int, default=16, help="small block size, KiB")
    ap.add_argument("--small-blocks", type=int, default=8192, help="small blocks per pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-manager", action="store_true", help="skip the KvBlockManager pass")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    has_fio = shutil.which("fio") is not None
    large_layout = BlockLayout(ModelSpec(**LARGE), PAGE)  # type: ignore[arg-type]
    n_large = max(a.threads, int(a.gib * 2**30) // large_layout.bytes_per_block)
    base = Path(tempfile.mkdtemp(prefix="kvbm-bench-fs-", dir=a.dir))
    try:
        res: dict[str, Any] = {"dir": a.dir, "threads": a.threads, "batch": a.batch,
                               "repeats": a.repeats, "fio": has_fio}
        res["large"] = run_size(base, "large", LARGE, n_large, a, has_fio)
        res["small"] = run_size(base, "small", small_model(a.small_kib), a.small_blocks, a, has_fio)
        if not a.no_manager:
            (base / "manager").mkdir()
            mgr = bench_manager(base / "manager", n_large, a.batch, a.threads, a.repeats)
            ref = res["large"]["fio" if has_fio else "python_raw"]
            res["manager"] = {**mgr, "write_ratio": mgr["write_gbps"] / ref["write_gbps"],
                              "read_ratio": mgr["read_gbps"] / ref["read_gbps"]}
    finally:
        shutil.rmtree(base, ignore_errors=True)

    if a.json:
        print(json.dumps(res, indent=2))
        return
    for size in ("large", "small"):
        r = res[size]
        io = "O_DIRECT" if r["o_direct"] else "buffered"
        print(f"{r['blocks']} blocks of {r['block_bytes'] / 1024:.0f} KiB (files of "
              f"{r['file_bytes']} B) on {a.dir} ({r['filesystem']}, {io}), {a.threads} threads, "
              f"batches of {a.batch}, best of {a.repeats}; limit: {r['limit']}")
        print(f"  {'path':24s} {'write GB/s':>10s} {'files/s':>9s} {'ratio':>6s} "
              f"{'read GB/s':>10s} {'files/s':>9s} {'ratio':>6s}")
        rows = [("fio", r.get("fio")), ("python raw loop", r["python_raw"]), ("FsTier", r["tier"])]
        for name, row in rows:
            if row is None:
                continue
            wr, rr = row.get("write_ratio", 1.0), row.get("read_ratio", 1.0)
            print(f"  {name:24s} {row['write_gbps']:10.2f} {row['write_files_per_s']:9.0f} {wr:6.2f} "
                  f"{row['read_gbps']:10.2f} {row['read_files_per_s']:9.0f} {rr:6.2f}")
        print(f"  probe: {r['probe_us_per_key']:.1f} µs per key (a hit)")
    if "manager" in res:
        m = res["manager"]
        print(f"KvBlockManager [fs], 2 MiB blocks: offload {m['write_gbps']:.2f} GB/s "
              f"({m['write_ratio']:.2f} of the limit), onboard {m['read_gbps']:.2f} GB/s "
              f"({m['read_ratio']:.2f})")


if __name__ == "__main__":
    main()

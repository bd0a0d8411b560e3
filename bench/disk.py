"""Disk tier write/read GB/s for batches of 2 MiB blocks, beside fio and ``dd`` with O_DIRECT.

In one run, on one directory: the same bytes written and read by fio (the limit:
O_DIRECT, 2 MiB blocks, ``numjobs`` = the tier's ``--threads``, psync, as the tier's
threads issue pwrite/pread; ``make fio`` installs it), with ``dd oflag=direct`` /
``dd iflag=direct`` beside it (bs=2M, one request in flight), through ``DiskTier``
directly, and through ``KvBlockManager``
(offload / onboard, chain ``[disk]``, which adds the staging copy). Then the start-up
index rebuild: the slot headers of the written cache are scanned again by a fresh
tier, in blocks/s, with the time that rate projects for a full 100 GB cache.

Run: ``python bench/disk.py [--dir /tmp] [--gib 0.5] [--batch 64] [--threads 8]
[--engine posix|nixl|both] [--repeats 3] [--rebuild-blocks 2048] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvbm import BlockLayout, ContiguousBlocks, KvBlockManager, ModelSpec, Namespace
from kvbm.layout import aligned_empty
from kvbm.tier import TierContext
from kvbm_bench.limits import best_of, find_fio, fio_gbps
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.format import HEADER_BYTES
from kvbm_tiers_disk.tier import DiskTier

# Llama-3-8B's KV for 16 tokens: 32 layers x (K,V) x 16 x 8 heads x 128 x bf16 = 2 MiB.
MODEL = {"name": "bench-llama-3-8b", "num_layers": 32, "num_kv_heads": 8, "head_dim": 128,
         "dtype": "bfloat16"}
PAGE = 16


def dd_seconds(args: list[str]) -> float:
    """Seconds dd reports for its copy (its own timer, not process start-up)."""
    r = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    m = re.search(r"copied, ([0-9.e+-]+) s", r.stderr)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {r.stderr!r}")
    return float(m.group(1))


def dd_limits(work: Path, src: Path, nbytes: int, repeats: int) -> tuple[float, float]:
    out = work / "dd.bin"
    count = nbytes // (2 << 20)
    w = min(dd_seconds([f"if={src}", f"of={out}", "bs=2M", f"count={count}", "oflag=direct",
                        "conv=notrunc"]) for _ in range(repeats))
    r = min(dd_seconds([f"if={out}", "of=/dev/null", "bs=2M", f"count={count}", "iflag=direct"])
            for _ in range(repeats))
    out.unlink()
    return nbytes / w / 1e9, nbytes / r / 1e9


def tier_for(work: Path, n: int, threads: int, engine: str) -> DiskTier:
    layout = BlockLayout(ModelSpec(**MODEL), PAGE)
    ns = Namespace(MODEL["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(work), num_blocks=n,
                         io_threads=threads, io_engine=engine)  # type: ignore[arg-type]
    return DiskTier(cfg, TierContext("disk", ns, layout, n))


def bench_tier(work: Path, data: np.ndarray, batch: int, threads: int, engine: str,
               repeats: int) -> dict[str, float]:
    n, bb = data.shape
    keys = [i.to_bytes(16, "little") for i in range(n)]
    src = [data[i] for i in range(n)]
    dst_arena = aligned_empty(n * bb).reshape(n, bb)
    dst = [dst_arena[i] for i in range(n)]
    tier = tier_for(work, n, threads, engine)
    tier.recover()

    def write() -> None:
        for i in range(0, n, batch):
            ok = tier.write(list(range(i, min(n, i + batch))), keys[i : i + batch], src[i : i + batch])
            assert all(ok), "bench write failed"

    def read() -> None:
        for i in range(0, n, batch):
            ok = tier.read(list(range(i, min(n, i + batch))), keys[i : i + batch], dst[i : i + batch])
            assert all(ok), "bench read failed"

    try:
        tw = best_of(write, repeats)
        tr = best_of(read, repeats)
        assert np.array_equal(dst_arena[:: max(1, n // 7)], data[:: max(1, n // 7)]), "read back differs"
    finally:
        tier.close()
    return {"write_gbps": n * bb / tw / 1e9, "read_gbps": n * bb / tr / 1e9}


def bench_rebuild(work: Path, n: int, threads: int, repeats: int) -> dict[str, float]:
    """Fill ``n`` slots (one buffer, ``n`` keys), then time fresh tiers scanning them."""
    tier = tier_for(work, n, threads, "posix")
    try:
        tier.recover()
        buf = aligned_empty(tier.block_bytes)
        buf[:] = 7
        for i in range(0, n, 64):
            slots = list(range(i, min(n, i + 64)))
            ok = tier.write(slots, [s.to_bytes(16, "little") for s in slots], [buf] * len(slots))
            assert all(ok), "rebuild bench write failed"
    finally:
        tier.close()
    best = float("inf")
    for _ in range(repeats):
        t = tier_for(work, n, threads, "posix")
        try:
            t0 = time.perf_counter()
            found = t.recover()
            best = min(best, time.perf_counter() - t0)
            assert len(found) == n, f"rebuild found {len(found)} of {n} blocks"
        finally:
            t.close()
    return {"blocks": n, "seconds": best, "blocks_per_s": n / best}


def bench_manager(work: Path, data: np.ndarray, batch: int, threads: int, repeats: int) -> dict[str, float]:
    n, bb = data.shape
    cfg = {"model": MODEL, "page_size": PAGE, "tiers": [
        {"type": "disk", "num_blocks": n, "path": str(work), "admission": "all",
         "io_threads": threads}]}
    wt, rt = float("inf"), float("inf")
    out = np.zeros_like(data)
    with KvBlockManager.from_config(cfg) as m:
        src = ContiguousBlocks(data, m.layout)
        dst = ContiguousBlocks(out, m.layout)
        for rep in range(repeats):
            # New keys each pass: they evict the last pass's blocks and reuse their slots.
            hashes = m.hash_tokens(list(range(rep * n * PAGE, (rep + 1) * n * PAGE)))
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                r = m.offload(hashes[i : i + batch], src, range(i, min(n, i + batch)))
                assert r.stored == min(batch, n - i), f"offload stored {r.stored}"
            wt = min(wt, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                with m.match_prefix(hashes[i : i + batch]) as match:
                    assert m.onboard(match, dst, range(i, i + match.num_blocks)).loaded == match.num_blocks
            rt = min(rt, time.perf_counter() - t0)
        assert np.array_equal(out[:: max(1, n // 7)], data[:: max(1, n // 7)])
    return {"write_gbps": n * bb / wt / 1e9, "read_gbps": n * bb / rt / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="directory under test")
    ap.add_argument("--gib", type=float, default=0.5, help="GiB moved per pass")
    ap.add_argument("--batch", type=int, default=64, help="blocks per write/read call")
    ap.add_argument("--threads", type=int, default=8, help="disk tier io_threads")
    ap.add_argument("--engine", choices=["posix", "nixl", "both"], default="posix")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rebuild-blocks", type=int, default=2048,
                    help="2 MiB slots written, then scanned by a fresh tier (index rebuild)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    layout = BlockLayout(ModelSpec(**MODEL), PAGE)
    bb = layout.bytes_per_block
    n = max(1, int(a.gib * 2**30) // bb)
    nbytes = n * bb
    base = Path(tempfile.mkdtemp(prefix="kvbm-bench-disk-", dir=a.dir))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else base
    src_file = Path(tempfile.mkstemp(prefix="kvbm-bench-src-", dir=shm)[1])
    try:
        data = aligned_empty(nbytes).reshape(n, bb)
        data.reshape(-1)[:] = np.frombuffer(np.random.default_rng(0).bytes(nbytes), np.uint8)
        data.tofile(src_file)  # dd's input, from memory (tmpfs), so only the disk side is timed
        dd_w, dd_r = dd_limits(base, src_file, nbytes, a.repeats)
        fio = find_fio()
        got = fio_gbps(str(base), a.threads, nbytes, a.repeats, fio=fio) if fio else None
        # Without fio the limit is dd's, and the table says so.
        lim_w, lim_r = got if got is not None else (dd_w, dd_r)
        limit = (f"fio O_DIRECT bs=2M numjobs={a.threads}" if got is not None else
                 "dd O_DIRECT bs=2M (no fio: run `make fio`)" if fio is None else
                 "dd O_DIRECT bs=2M (fio failed here)")
        engines = ["posix", "nixl"] if a.engine == "both" else [a.engine]
        res: dict[str, Any] = {
            "dir": a.dir, "block_bytes": bb, "blocks": n, "bytes_per_pass": nbytes,
            "batch": a.batch, "io_threads": a.threads, "repeats": a.repeats,
            "dd_write_gbps": dd_w, "dd_read_gbps": dd_r, "limit": limit,
            "limit_write_gbps": lim_w, "limit_read_gbps": lim_r,
            "fio_write_gbps": got[0] if got else None, "fio_read_gbps": got[1] if got else None,
        }

        def ratios(r: dict[str, float]) -> dict[str, float]:
            return {"write_ratio": r["write_gbps"] / lim_w, "read_ratio": r["read_gbps"] / lim_r,
                    "write_ratio_vs_dd": r["write_gbps"] / dd_w, "read_ratio_vs_dd": r["read_gbps"] / dd_r}

        for eng in engines:
            r = bench_tier(base / f"tier-{eng}", data, a.batch, a.threads, eng, a.repeats)
            res[f"tier_{eng}"] = {**r, **ratios(r)}
        mgr = bench_manager(base / "manager", data, a.batch, a.threads, a.repeats)
        res["manager"] = {**mgr, **ratios(mgr)}
        reb = bench_rebuild(base / "rebuild", a.rebuild_blocks, a.threads, a.repeats)
        rate = reb["blocks_per_s"]
        res["rebuild"] = reb
        slots_100gb = 100 * 10**9 // (bb + HEADER_BYTES)
        res["rebuild_100gb_slots"] = slots_100gb
        res["rebuild_100gb_projected_s"] = slots_100gb / rate
    finally:
        src_file.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)

    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{n} blocks of {bb >> 20} MiB ({nbytes / 1e9:.2f} GB) on {a.dir}, batches of "
          f"{a.batch}, io_threads {a.threads}, best of {a.repeats}")
    print(f"  limit: {limit}")
    print(f"  {'path':28s} {'write GB/s':>10s} {'x limit':>7s} {'x dd':>6s} {'read GB/s':>10s} "
          f"{'x limit':>7s} {'x dd':>6s}")
    print(f"  {'limit':28s} {lim_w:10.2f} {1.0:7.2f} {lim_w / dd_w:6.2f} {lim_r:10.2f} {1.0:7.2f} "
          f"{lim_r / dd_r:6.2f}")
    print(f"  {'dd O_DIRECT bs=2M (1 request)':28s} {dd_w:10.2f} {dd_w / lim_w:7.2f} {1.0:6.2f} "
          f"{dd_r:10.2f} {dd_r / lim_r:7.2f} {1.0:6.2f}")
    rows = [(f"DiskTier ({e})", res[f"tier_{e}"]) for e in engines] + [("KvBlockManager [disk]", res["manager"])]
    for name, r in rows:
        print(f"  {name:28s} {r['write_gbps']:10.2f} {r['write_ratio']:7.2f} {r['write_ratio_vs_dd']:6.2f} "
              f"{r['read_gbps']:10.2f} {r['read_ratio']:7.2f} {r['read_ratio_vs_dd']:6.2f}")
    print(f"  index rebuild: {rate:,.0f} blocks/s ({reb['blocks']} slots in "
          f"{reb['seconds'] * 1e3:.1f} ms); a full "
          f"100 GB cache ({slots_100gb:,} slots) projects to {res['rebuild_100gb_projected_s']:.2f} s")


if __name__ == "__main__":
    main()

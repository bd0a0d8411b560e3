"""Disk tier write/read GB/s for batches of 2 MiB blocks, beside fio and ``dd`` with O_DIRECT.

On one directory, in ``--repeats`` rounds, each figure of each path is paired with fio
measured right around it: fio, the path, the path again, fio again (ABBA, so a load that
rises or falls over the pair hits both sides alike); the path's figure is the better of
its two passes, fio's the best of its runs, and the pair's ratio is one sample;
the table shows each path's ratios as min/median/max over the rounds. fio is the limit:
O_DIRECT, 2 MiB blocks, ``numjobs`` = the tier's ``--threads``, at two depths each side
of the pair (psync then libaio before the path, libaio then psync after it): ``psync``
(iodepth 1, one request in flight per job) and ``libaio`` at the tier's in-flight depth
(``kvbm_bench.limits.FIO_DEPTHS``: the native loop keeps a block's data, the last one's
header and the next one's invalidation in flight per thread), each run moving half the
bytes, so a pair's fio takes about as long as one depth's did; the limit is the better
of the depths (both are printed), as the memory limits take the better of 1 and N
threads. Where fio has no libaio, psync alone, and the table says so. On files laid out once
before the rounds in the same directory, so fio overwrites allocated blocks as the tier
does its slots (``make fio`` installs it). The ratio of fio's two runs in each pair
(``fio ÷ fio``) shows how much the figures move by themselves within a pair.
Paths: ``DiskTier`` directly, and ``KvBlockManager`` offload / onboard with the chain
``[disk]``, from plain host memory (``ContiguousBlocks``: the tier writes the caller's
blocks and reads into them, no staging copy) and from a source without views (as an
engine's device memory: every block goes through a staging buffer, the copy of one part
overlapping the write of the last). Every byte of every path is checked after each
pair, outside the timing. ``dd oflag=direct`` / ``iflag=direct`` (bs=2M, one request in
flight) is measured once beside them. The caller's memory of the tier and host-memory
paths is measured on 4 KiB pages (``aligned_empty``: shared anonymous memory) and on
2 MiB pages (private, advised ``MADV_HUGEPAGE``, as kvbm's host tier arena and staging
buffers are): an O_DIRECT request pins its buffer page by page and the checksum walks
it, so the pages matter; fio's few reused buffers are cheap either way (``--pages``;
``--paths`` picks the rows).
``--io-loop python`` (or ``both``) also measures the tier with its per-block Python loop
instead of the native one (``kvbm_tiers_disk._native_io``), ``--io-loop native-sync`` the
native loop with pread/pwrite instead of the kernel's AIO (each block's checksum then
after its transfer, not during it; a comma-separated list measures several), and ``--python-load`` keeps
a pure-Python thread busy in this process during the rounds, as an engine's scheduler
is: the Python loop's threads then wait for the GIL between requests.
Then the start-up index rebuild: the slot
headers of the written cache are scanned again by a fresh tier, in blocks/s, with
the time that rate projects for a full 100 GB cache.

Run: ``python bench/disk.py [--dir /tmp] [--gib 0.5] [--batch 64] [--threads 8]
[--engine posix|nixl|both] [--pages 4k|2m|both] [--paths tier,manager,staged]
[--io-loop native|native-sync|python|both|LIST] [--python-load] [--repeats 5] [--rebuild-blocks 2048]
[--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvbm import BlockLayout, ContiguousBlocks, KvBlockManager, ModelSpec, Namespace
from kvbm.layout import aligned_empty
from kvbm.staging import huge_page_arena
from kvbm.tier import TierContext
from kvbm_bench.limits import BLOCK, best_of, find_fio, fio_depth_name, fio_depths, fio_run
from kvbm_tiers_disk import _native_io as native_io
from kvbm_tiers_disk._xxh import implementation as checksum_implementation
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.format import HEADER_BYTES
from kvbm_tiers_disk.tier import DiskTier

# Llama-3-8B's KV for 16 tokens: 32 layers x (K,V) x 16 x 8 heads x 128 x bf16 = 2 MiB.
MODEL = {"name": "bench-llama-3-8b", "num_layers": 32, "num_kv_heads": 8, "head_dim": 128,
         "dtype": "bfloat16"}
PAGE = 16


def caller_memory(like: np.ndarray, huge: bool) -> np.ndarray:
    """A copy of ``like`` on 2 MiB pages (``huge``) or on 4 KiB pages, page-aligned."""
    out = (huge_page_arena if huge else aligned_empty)(like.nbytes).reshape(like.shape)
    out[:] = like
    return out


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


class FioLimit:
    """fio on files laid out once in ``work``: one run writes or reads them all (O_DIRECT,
    2 MiB requests, ``jobs`` jobs) at each of ``depths`` (``fio_depths``: psync iodepth 1
    and libaio at the tier's depth, or psync alone), ``nbytes`` shared between the depths;
    GB/s from fio's own report (``kvbm_bench.limits.fio_run``)."""

    def __init__(self, fio: str, work: Path, jobs: int, nbytes: int) -> None:
        self.fio, self.work, self.jobs = fio, work, max(1, jobs)
        work.mkdir()
        self.depths = fio_depths(fio, str(work))
        self.per_job = max(BLOCK, nbytes // len(self.depths) // self.jobs // BLOCK * BLOCK)
        fio_run(fio, str(work), "write", self.jobs, self.per_job)  # lay the files out, untimed

    def run(self, rw: str, reverse: bool = False) -> dict[int, float]:
        """GB/s at each depth, run in order (``reverse``: deepest first)."""
        order = sorted(self.depths, reverse=reverse)
        return {d: fio_run(self.fio, str(self.work), rw, self.jobs, self.per_job, depth=d)
                for d in order}


def fio_pair(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """(limit, noise) of one pair from fio's runs at each depth before and after the
    path: the limit the best of all of them, the noise the better depth before over the
    better after."""
    return max(*before.values(), *after.values()), max(before.values()) / max(after.values())


def tier_for(work: Path, n: int, threads: int, engine: str) -> DiskTier:
    layout = BlockLayout(ModelSpec(**MODEL), PAGE)
    ns = Namespace(MODEL["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(work), num_blocks=n,
                         io_threads=threads, io_engine=engine)  # type: ignore[arg-type]
    return DiskTier(cfg, TierContext("disk", ns, layout, n))


class TierPath:
    """``DiskTier.write`` / ``read`` of the whole data in batches, straight from its rows."""

    def __init__(self, work: Path, data: np.ndarray, batch: int, threads: int, engine: str,
                 huge: bool = False, native: bool = True, aio: bool = True) -> None:
        n, bb = data.shape
        self.n, self.batch, self.data = n, batch, data
        self.keys = [i.to_bytes(16, "little") for i in range(n)]
        src = caller_memory(data, huge)
        self.src = [src[i] for i in range(n)]
        self.out = caller_memory(np.zeros_like(data), huge)
        self.dst = [self.out[i] for i in range(n)]
        self.tier = tier_for(work, n, threads, engine)
        self.tier._aio = aio
        if not native:
            self.tier._nio = None  # the per-block Python loop
        self.tier.recover()

    def write(self) -> None:
        n, b = self.n, self.batch
        for i in range(0, n, b):
            ok = self.tier.write(list(range(i, min(n, i + b))), self.keys[i : i + b], self.src[i : i + b])
            assert all(ok), "bench write failed"

    def read(self) -> None:
        self.out[:, :64] = 0  # a read that skipped a block cannot pass the check below
        n, b = self.n, self.batch
        for i in range(0, n, b):
            ok = self.tier.read(list(range(i, min(n, i + b))), self.keys[i : i + b], self.dst[i : i + b])
            assert all(ok), "bench read failed"

    def check(self) -> None:
        assert np.array_equal(self.out, self.data), "read back differs"

    def close(self) -> None:
        self.tier.close()


class CopyOnly:
    """An engine's blocks that offer no views (device memory): the manager stages them."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        for i, d in zip(indices, dst, strict=True):
            np.copyto(d, self.array[i])

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        for i, s in zip(indices, src, strict=True):
            np.copyto(self.array[i], s)


class ManagerPath:
    """``KvBlockManager.offload`` / ``onboard`` with the chain ``[disk]``; new keys each
    pass (they evict the last pass's blocks and reuse their slots)."""

    def __init__(self, work: Path, data: np.ndarray, batch: int, threads: int, staged: bool,
                 huge: bool = False) -> None:
        n, _ = data.shape
        self.n, self.batch, self.data = n, batch, data
        cfg = {"model": MODEL, "page_size": PAGE, "tiers": [
            {"type": "disk", "num_blocks": n, "path": str(work), "admission": "all",
             "io_threads": threads}]}
        self.m = KvBlockManager.from_config(cfg)
        self.out = caller_memory(np.zeros_like(data), huge)
        wrap: Any = CopyOnly if staged else (lambda a: ContiguousBlocks(a, self.m.layout))
        self.src, self.dst = wrap(caller_memory(data, huge)), wrap(self.out)
        self.passes = 0
        self.hashes: list[bytes] = []

    def write(self) -> None:
        n, b = self.n, self.batch
        self.passes += 1
        self.hashes = self.m.hash_tokens(list(range(self.passes * n * PAGE, (self.passes + 1) * n * PAGE)))
        for i in range(0, n, b):
            r = self.m.offload(self.hashes[i : i + b], self.src, range(i, min(n, i + b)))
            assert r.stored == min(b, n - i), f"offload stored {r.stored}"

    def read(self) -> None:
        self.out[:, :64] = 0
        n, b = self.n, self.batch
        for i in range(0, n, b):
            with self.m.match_prefix(self.hashes[i : i + b]) as match:
                got = self.m.onboard(match, self.dst, range(i, i + match.num_blocks)).loaded
                assert got == min(b, n - i), f"onboard loaded {got}"

    def check(self) -> None:
        assert np.array_equal(self.out, self.data), "read back differs"

    def close(self) -> None:
        self.m.close()


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


def summary(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="directory under test")
    ap.add_argument("--gib", type=float, default=0.5, help="GiB moved per pass")
    ap.add_argument("--batch", type=int, default=64, help="blocks per write/read call")
    ap.add_argument("--threads", type=int, default=8, help="disk tier io_threads")
    ap.add_argument("--engine", choices=["posix", "nixl", "both"], default="posix")
    ap.add_argument("--pages", choices=["4k", "2m", "both"], default="both",
                    help="page size of the caller's memory on the tier and host-memory paths")
    ap.add_argument("--paths", default="tier,manager,staged",
                    help="rows measured, comma-separated: tier, manager (host memory), staged")
    ap.add_argument("--io-loop", default="native",
                    help="the disk tier's I/O loop on the DiskTier rows: native, native-sync "
                         "(no AIO), python, both (native,python), or a comma-separated list")
    ap.add_argument("--python-load", action="store_true",
                    help="a pure-Python thread busy in this process during the rounds")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds (each: every path, each figure paired with fio around it)")
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
    engines = ["posix", "nixl"] if a.engine == "both" else [a.engine]
    paths: dict[str, Any] = {}
    try:
        data = aligned_empty(nbytes).reshape(n, bb)
        data.reshape(-1)[:] = np.frombuffer(np.random.default_rng(0).bytes(nbytes), np.uint8)
        data.tofile(src_file)  # dd's input, from memory (tmpfs), so only the disk side is timed
        dd_w, dd_r = dd_limits(base, src_file, nbytes, a.repeats)
        fio = find_fio()
        want = set(a.paths.split(","))
        if not want <= {"tier", "manager", "staged"}:
            raise SystemExit(f"--paths {a.paths!r}: name rows from tier, manager, staged "
                             "(comma-separated), e.g. --paths tier")
        pages = ["4k", "2m"] if a.pages == "both" else [a.pages]
        loops = ["native", "python"] if a.io_loop == "both" else a.io_loop.split(",")
        if not set(loops) <= {"native", "native-sync", "python"}:
            raise SystemExit(f"--io-loop {a.io_loop!r}: name loops from native, native-sync, "
                             "python (comma-separated), e.g. --io-loop native,native-sync")
        tier_rows = [(eng, pg, lp) for pg in pages for eng in engines for lp in loops
                     if "tier" in want]
        for eng, pg, lp in tier_rows:
            paths[f"tier_{eng}_{pg}_{lp}"] = TierPath(base / f"tier-{eng}-{pg}-{lp}", data, a.batch,
                                                      a.threads, eng, huge=pg == "2m",
                                                      native=lp != "python",
                                                      aio=lp == "native")
        if "manager" in want:
            for pg in pages:
                paths[f"manager_{pg}"] = ManagerPath(base / f"manager-{pg}", data, a.batch,
                                                     a.threads, staged=False, huge=pg == "2m")
        if "staged" in want:
            paths["manager_staged"] = ManagerPath(base / "staged", data, a.batch, a.threads,
                                                  staged=True)
        for p in paths.values():  # first pass into the fresh files, untimed
            p.write()
            p.read()
            p.check()
        limiter: FioLimit | None = None
        why_dd = "no fio: run `make fio`"
        if fio is not None:
            try:
                limiter = FioLimit(fio, base / "fio", a.threads, nbytes)
            except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                why_dd = f"fio failed here: {e}"
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                sum(range(2000))

        def limit_once(rw: str, reverse: bool) -> dict[int, float]:
            # Without fio the limit is dd's (measured once, above), and the table says so.
            if limiter is None:
                return {1: dd_w if rw == "write" else dd_r}
            return limiter.run(rw, reverse)

        # got[path][rw]: (path GB/s, limit GB/s, fio first / fio second) per round;
        # depth_got[rw][depth]: fio's best of its two runs in each pair, at that depth
        depth_got: dict[str, dict[int, list[float]]] = {"write": {}, "read": {}}
        got: dict[str, dict[str, list[tuple[float, float, float]]]] = {
            k: {"write": [], "read": []} for k in paths}
        spinner = threading.Thread(target=spin, daemon=True) if a.python_load else None
        if spinner is not None:
            spinner.start()
        for _ in range(a.repeats):
            for k, p in paths.items():
                for rw, fn in (("write", p.write), ("read", p.read)):
                    f1 = limit_once(rw, False)
                    g = nbytes / best_of(fn, 2) / 1e9
                    f2 = limit_once(rw, True)
                    got[k][rw].append((g, *fio_pair(f1, f2)))
                    for d in f1:
                        depth_got[rw].setdefault(d, []).append(max(f1[d], f2[d]))
                p.check()  # every byte of the last pass, outside the timing
        stop.set()
        if spinner is not None:
            spinner.join()
        for p in paths.values():
            p.close()
        paths.clear()
        limit = (f"fio O_DIRECT bs=2M numjobs={a.threads}, {fio_depth_name(limiter.depths)}"
                 if limiter is not None else f"dd O_DIRECT bs=2M ({why_dd})")
        fio_all = {rw: [x[1] for g in got.values() for x in g[rw]] for rw in ("write", "read")}
        self_all = {rw: [x[2] for g in got.values() for x in g[rw]] for rw in ("write", "read")}
        lim_w = statistics.median(fio_all["write"]) if fio_all["write"] else dd_w
        lim_r = statistics.median(fio_all["read"]) if fio_all["read"] else dd_r
        res: dict[str, Any] = {
            "dir": a.dir, "block_bytes": bb, "blocks": n, "bytes_per_pass": nbytes,
            "batch": a.batch, "io_threads": a.threads, "rounds": a.repeats,
            "checksum": checksum_implementation(),
            "native_io_loop": native_io.load() is not None, "python_load": a.python_load,
            "dd_write_gbps": dd_w, "dd_read_gbps": dd_r, "limit": limit,
            "limit_write_gbps": lim_w, "limit_read_gbps": lim_r,
            "limit_write_pairs": fio_all["write"], "limit_read_pairs": fio_all["read"],
            "fio_write_gbps": lim_w if limiter is not None else None,
            "fio_depths": list(limiter.depths) if limiter is not None else [],
            "fio_depth_write_gbps": {d: statistics.median(v) for d, v in depth_got["write"].items()}
            if limiter is not None else {},
            "fio_depth_read_gbps": {d: statistics.median(v) for d, v in depth_got["read"].items()}
            if limiter is not None else {},
            "fio_read_gbps": lim_r if limiter is not None else None,
            "fio_self_write_range": summary(self_all["write"]) if self_all["write"] else None,
            "fio_self_read_range": summary(self_all["read"]) if self_all["read"] else None,
        }
        for k, g in got.items():
            wr = [x / y for x, y, _ in g["write"]]
            rr = [x / y for x, y, _ in g["read"]]
            res[k] = {"write_gbps": statistics.median(x[0] for x in g["write"]),
                      "read_gbps": statistics.median(x[0] for x in g["read"]),
                      "write_rounds": [x[0] for x in g["write"]],
                      "read_rounds": [x[0] for x in g["read"]],
                      "write_ratio": statistics.median(wr), "read_ratio": statistics.median(rr),
                      "write_ratio_range": summary(wr), "read_ratio_range": summary(rr),
                      "write_ratio_vs_dd": statistics.median(x[0] for x in g["write"]) / dd_w,
                      "read_ratio_vs_dd": statistics.median(x[0] for x in g["read"]) / dd_r}
        reb = bench_rebuild(base / "rebuild", a.rebuild_blocks, a.threads, a.repeats)
        rate = reb["blocks_per_s"]
        res["rebuild"] = reb
        slots_100gb = 100 * 10**9 // (bb + HEADER_BYTES)
        res["rebuild_100gb_slots"] = slots_100gb
        res["rebuild_100gb_projected_s"] = slots_100gb / rate
        res["loadavg"] = os.getloadavg()
    finally:
        for p in paths.values():
            p.close()
        src_file.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)

    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{n} blocks of {bb >> 20} MiB ({nbytes / 1e9:.2f} GB) on {a.dir}, batches of "
          f"{a.batch}, io_threads {a.threads}, {a.repeats} rounds (best of 2 passes "
          f"each); load average {' '.join(f'{x:.1f}' for x in res['loadavg'])}; checksum "
          f"{res['checksum']}" + ("" if res["native_io_loop"] else "; no native I/O loop here "
                                   "(no C compiler): every DiskTier row runs the Python loop")
          + ("; a pure-Python thread busy in this process" if a.python_load else ""))
    print(f"  limit: {limit}, measured around each figure (fio, path, path, fio); GB/s the "
          "median over the rounds, x limit min/median/max of the rounds' pair ratios")
    print(f"  {'path':48s} {'write GB/s':>10s} {'x limit':>16s} {'read GB/s':>10s} {'x limit':>16s}")

    def rng(r: dict[str, float]) -> str:
        return f"{r['min']:.2f}/{r['median']:.2f}/{r['max']:.2f}"

    print(f"  {'limit (median of its pairs)':48s} {lim_w:10.2f} {'1':>16s} {lim_r:10.2f} {'1':>16s}")
    for d in res["fio_depths"]:
        fw, fr = res["fio_depth_write_gbps"][d], res["fio_depth_read_gbps"][d]
        name = "psync iodepth 1" if d <= 1 else f"libaio iodepth {d}"
        print(f"  {f'fio {name} (median of its pairs)':48s} {fw:10.2f} {fw / lim_w:16.2f} "
              f"{fr:10.2f} {fr / lim_r:16.2f}")
    if res["fio_self_write_range"] is not None:
        print(f"  {'fio ÷ fio (its two runs in a pair: noise)':48s} {'':10s} "
              f"{rng(res['fio_self_write_range']):>16s} {'':10s} {rng(res['fio_self_read_range']):>16s}")
    print(f"  {'dd O_DIRECT bs=2M (1 request)':48s} {dd_w:10.2f} {dd_w / lim_w:16.2f} "
          f"{dd_r:10.2f} {dd_r / lim_r:16.2f}")
    pg_name = {"4k": "4 KiB pages", "2m": "2 MiB pages"}
    rows = [(f"DiskTier ({e}), {pg_name[pg]}" + (f", {lp} loop" if len(loops) > 1 else ""),
             f"tier_{e}_{pg}_{lp}") for e, pg, lp in tier_rows]
    rows += [(f"KvBlockManager [disk], host, {pg_name[pg]}", f"manager_{pg}") for pg in pages
             if "manager" in want]
    rows += [("KvBlockManager [disk], staged", "manager_staged")] if "staged" in want else []
    for name, k in rows:
        r = res[k]
        print(f"  {name:48s} {r['write_gbps']:10.2f} {rng(r['write_ratio_range']):>16s} "
              f"{r['read_gbps']:10.2f} {rng(r['read_ratio_range']):>16s}")
    print(f"  index rebuild: {rate:,.0f} blocks/s ({reb['blocks']} slots in "
          f"{reb['seconds'] * 1e3:.1f} ms); a full "
          f"100 GB cache ({slots_100gb:,} slots) projects to {res['rebuild_100gb_projected_s']:.2f} s")


if __name__ == "__main__":
    main()

"""Host tier: engine-shaped and contiguous offload/onboard beside a memory copy of the same bytes.

The engine side is vLLM's: one bf16 tensor per layer, ``[2, num_blocks, page, heads,
head_dim]`` (32 layers, 8 KV heads of 128, page 16: 2 MiB blocks, two 32 KiB runs per
block and layer), block ids in random order as a paged engine hands them out. Each
batch goes through ``KvBlockManager.offload`` / ``onboard`` with a host tier, and is
timed right after plain copies of the same bytes between two touched buffers with
1 thread and with ``copy_threads`` threads, each by ``memcpy`` and by streaming
stores; the fastest of the four is the batch's limit (the machine's memory bandwidth
moves from one moment to the next, so figure and limit alternate). The ratio to the
fastest ``memcpy`` alone is shown beside it. Every onboarded block is compared with the block it was
offloaded from, layer by layer with torch (0 mismatched or the bench fails).

The engine's tensors are registered with the manager's ``engine_huge_pages``
(``--huge-pages``; default ``auto``: moved onto 2 MiB pages on a background thread,
which the bench waits for before timing and reports).
``--paths native,memcpy,numpy`` runs the adapter's native batch copy (streaming
stores for batches past ``_native.STREAM_MIN_BYTES``), the same loop with ``memcpy``
only, and its numpy per-(block, layer) fallback in the same run, interleaved, for a
before/after (contiguous blocks take the first two); ``small`` adds the native loop
on a copy of the engine's tensors left on 4 KiB pages (``engine_huge_pages`` off),
``huge`` one moved onto 2 MiB pages before registration returns (``on``), each
verified as the others. The ``adapter, 1 thread`` rows
time the adapter's copy alone (no manager, one thread) beside the best 1-thread copy
of the same bytes.

``--limit cold`` starts every limit copy and every timed figure from memory rather
than the cache (``kvbm_bench.limits.ColdPairs``: limit copies on a ring twice the
last-level cache, twice the cache read elsewhere before each figure); the default,
``warm``, times the limit's copies back to back on two buffers, as before.

Run: ``python bench/host.py [--batch 64] [--batches 4] [--repeats 3] [--limit warm|cold] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvbm.engine_blocks import _native, engine_blocks
from kvbm.layout import ContiguousBlocks
from kvbm.manager import KvBlockManager
from kvbm_bench.limits import ColdPairs, copy_limits

MODEL = {"name": "llama-3-8b-like", "num_layers": 32, "num_kv_heads": 8, "head_dim": 128,
         "dtype": "bfloat16"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    n = args.batch
    nb = 2 * n  # offload from the first half of the engine, onboard into the second
    host: dict[str, Any] = {"type": "host", "num_blocks": n * args.batches}
    cfg: dict[str, Any] = {"model": MODEL, "page_size": 16, "tiers": [host]}
    if args.huge_pages:
        cfg["engine_huge_pages"] = args.huge_pages
    if args.threads:  # else the defaults: as many copy threads as pay here (measured)
        cfg["copy_threads"] = host["copy_threads"] = args.threads
    mgr = KvBlockManager.from_config(cfg)
    lim_threads = args.threads or 2  # the limit tries 1 and N threads whatever the manager uses
    layout = mgr.layout
    bb = layout.bytes_per_block
    m = layout.model
    g = torch.Generator().manual_seed(0)
    kv = [torch.randint(0, 256, (2, nb, 16, m.num_kv_heads, m.head_dim * 2), generator=g,
                        dtype=torch.uint8).view(torch.bfloat16) for _ in range(m.num_layers)]
    kv_u8 = [t.view(torch.uint8) for t in kv]  # compared as bytes: random bf16 has NaNs
    engine: Any = engine_blocks(kv, layout, plugins=mgr.plugins,
                                huge_pages=mgr.settings.engine_huge_pages)
    main_engine = engine
    bg_s = None
    if engine.huge_pages is not None:  # 'auto': the move runs in the background; wait
        engine.huge_pages.wait()
        bg_s = engine.huge_pages.seconds
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    engines: dict[str, tuple[Any, list[Any]]] = {"": (engine, kv_u8)}
    huge_bytes = 0
    for extra, mode in (("huge", True), ("small", False)):
        if extra in paths:  # the same tensors' bytes in a copy on 2 MiB / 4 KiB pages
            kv_x = [t.clone() for t in kv]
            ex: Any = engine_blocks(kv_x, layout, plugins=mgr.plugins, huge_pages=mode)
            huge_bytes = max(huge_bytes, ex.huge_page_bytes)
            engines[extra] = (ex, [t.view(torch.uint8) for t in kv_x])
    rng = np.random.default_rng(1)
    contig_src = rng.integers(0, 256, (n, bb), dtype=np.uint8)
    contig_dst = np.zeros_like(contig_src)
    lim_bufs = (np.ones(n * bb, dtype=np.uint8), np.ones(n * bb, dtype=np.uint8))
    # Warm (the default): the limit's four copies back to back on two buffers (the
    # cache's speed where a batch fits in it), the figure as the loop leaves the cache.
    # Cold: each limit copy on its own pair of a ring twice the cache, and the cache
    # flushed (clean) before each timed figure, so figure and limit start from memory.
    ring = ColdPairs(n * bb) if args.limit == "cold" else None

    def cold_start() -> None:
        if ring is not None:
            ring.flush()
    pool = ThreadPoolExecutor(max(1, lim_threads - 1))
    native_ok = _native.copy_runs() is not None
    stream_at = _native.stream_min()

    def set_path(path: str) -> None:
        _native.enabled = path != "numpy"
        _native.set_stream_min(stream_at if path in ("native", "huge", "small") else None)

    def limit(threads: int) -> tuple[float, float]:
        """(best, best memcpy) seconds of copying the batch's bytes, right now."""
        got = copy_limits(lim_bufs[0][: n * bb], lim_bufs[1][: n * bb], threads, pool, ring)
        return min(got.values()), min(v for k, v in got.items() if k.startswith("memcpy"))
    rows: dict[str, list[dict[str, float]]] = {}
    verified = mismatched = 0
    serial = 0
    try:
        for _ in range(args.repeats):
            acc: dict[str, list[float]] = {}
            for _ in range(args.batches):
                for shape in ("engine", "contiguous"):
                    for path in (paths if shape == "engine" else
                                 [p for p in paths if p not in ("numpy", "huge", "small")]
                                 or ["native"]):
                        set_path(path)
                        engine, kv_u8 = engines[path if path in ("huge", "small") else ""]
                        serial += 1
                        tokens = rng.integers(0, 32000, n * 16, dtype=np.uint32)
                        tokens[0] = serial  # fresh hashes every batch
                        hashes = mgr.hash_tokens(tokens)
                        src_ids = rng.permutation(n).tolist()
                        dst_ids = (n + rng.permutation(n)).tolist()
                        label = f"{shape}[{path}]"
                        a = acc.setdefault(label, [0.0] * 6)
                        lim, lim_mc = limit(lim_threads)
                        cold_start()
                        if shape == "engine":
                            t0 = time.perf_counter()
                            stored = mgr.offload(hashes, engine, indices=src_ids).stored
                            t_off = time.perf_counter() - t0
                        else:
                            contig_src[:, :16] = np.frombuffer(b"".join(hashes),
                                                               dtype=np.uint8).reshape(n, 16)
                            cold_start()
                            t0 = time.perf_counter()
                            stored = mgr.offload(hashes, ContiguousBlocks(contig_src, layout)).stored
                            t_off = time.perf_counter() - t0
                        assert stored == n, f"stored {stored} of {n}"
                        a[0] += lim
                        a[1] += t_off
                        a[4] += lim_mc
                        for t in kv_u8:
                            t[:, n:].zero_()
                        contig_dst[:] = 0
                        lim, lim_mc = limit(lim_threads)
                        with mgr.match_prefix(hashes) as match:
                            assert match.num_blocks == n
                            cold_start()
                            t0 = time.perf_counter()
                            if shape == "engine":
                                loaded = mgr.onboard(match, engine, indices=dst_ids).loaded
                            else:
                                loaded = mgr.onboard(match, ContiguousBlocks(contig_dst,
                                                                             layout)).loaded
                            t_on = time.perf_counter() - t0
                        assert loaded == n, f"loaded {loaded} of {n}"
                        a[2] += lim
                        a[3] += t_on
                        a[5] += lim_mc
                        if shape == "engine":
                            for s, d in zip(src_ids, dst_ids):
                                ok = all(torch.equal(t[:, s], t[:, d]) for t in kv_u8)
                                verified += ok
                                mismatched += not ok
                        else:
                            for j in range(n):
                                ok = np.array_equal(contig_dst[j], contig_src[j])
                                verified += ok
                                mismatched += not ok
            # The copy alone, one thread, no manager: the adapter between the engine's
            # tensors and whole-block buffers, beside a 1-thread memcpy of the same bytes.
            views = list(lim_bufs[0][: n * bb].reshape(n, bb))
            for path in paths:
                set_path(path)
                engine = engines[path if path in ("huge", "small") else ""][0]
                a = acc.setdefault(f"engine[{path}] adapter, 1 thread", [0.0] * 6)
                for _ in range(args.batches):
                    ids = rng.permutation(nb)[:n].tolist()
                    lim, lim_mc = limit(1)
                    cold_start()
                    t0 = time.perf_counter()
                    engine.copy_out(ids, views)
                    a[0] += lim
                    a[1] += time.perf_counter() - t0
                    a[4] += lim_mc
                    lim, lim_mc = limit(1)
                    cold_start()
                    t0 = time.perf_counter()
                    engine.copy_in(ids, views)
                    a[2] += lim
                    a[3] += time.perf_counter() - t0
                    a[5] += lim_mc
            set_path("native")
            for label, (lo, fo, li, fi, mo, mi) in acc.items():
                nbytes = args.batches * n * bb
                rows.setdefault(f"offload {label}", []).append(
                    {"gbps": nbytes / fo / 1e9, "limit_gbps": nbytes / lo / 1e9, "ratio": lo / fo,
                     "memcpy_gbps": nbytes / mo / 1e9, "memcpy_ratio": mo / fo})
                rows.setdefault(f"onboard {label}", []).append(
                    {"gbps": nbytes / fi / 1e9, "limit_gbps": nbytes / li / 1e9, "ratio": li / fi,
                     "memcpy_gbps": nbytes / mi / 1e9, "memcpy_ratio": mi / fi})
    finally:
        _native.enabled = True
        _native.set_stream_min(stream_at)
        pool.shutdown()
        mgr.close()
    return {"batch_blocks": n, "block_bytes": bb, "batches": args.batches, "repeats": args.repeats,
            "threads": mgr.executor._copy_threads, "native_loop": native_ok, "rows": rows,
            "huge_page_bytes": huge_bytes, "limit_mode": args.limit,
            "engine_huge_pages": str(mgr.settings.engine_huge_pages),
            "engine_huge_page_bytes": main_engine.huge_page_bytes, "engine_huge_pages_s": bg_s,
            "cache_ring_bytes": 0 if ring is None else ring.ring.nbytes,
            "verified_blocks": verified, "mismatched_blocks": mismatched,
            "loadavg": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="blocks per offload/onboard (64)")
    p.add_argument("--batches", type=int, default=4, help="batches per repeat (4)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; min/median/max over them (3)")
    p.add_argument("--threads", type=int, default=0,
                   help="copy_threads of manager and tier (default: not set, so as many as pay "
                        "here, measured at start; the limit tries 1 and 2)")
    p.add_argument("--paths", default="native,memcpy,numpy",
                   help="copy paths, interleaved: native (streaming stores past 4 MiB), memcpy "
                        "(the native loop without them), numpy (default these three); huge: "
                        "native on a copy of the engine's tensors moved onto 2 MiB pages "
                        "(engine_huge_pages on); small: one left on 4 KiB pages (off)")
    p.add_argument("--huge-pages", choices=("auto", "on", "off"), default=None,
                   help="engine_huge_pages for the engine's tensors (default: the setting's, "
                        "auto; the bench waits for the background move before timing)")
    p.add_argument("--limit", choices=("warm", "cold"), default="warm",
                   help="warm (default, as before): the limit's copies back to back on two "
                        "buffers, the figure as the loop leaves the cache; cold: every limit "
                        "copy on its own pair of a ring twice the last-level cache, and twice "
                        "the cache read elsewhere before each timed figure, so both start "
                        "from memory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        mib = res["block_bytes"] / 2**20
        print(f"host tier, {res['batch_blocks']} blocks of {mib:g} MiB a batch, {res['batches']} "
              f"batches x {res['repeats']} repeats, {res['threads']} copy threads, native loop "
              f"{'built' if res['native_loop'] else 'NOT available (numpy)'}; load "
              + " ".join(f"{x:.2f}" for x in res["loadavg"]))
        bg = res["engine_huge_pages_s"]
        print(f"engine_huge_pages={res['engine_huge_pages']}: "
              f"{res['engine_huge_page_bytes'] / 2**20:.0f} MiB of the engine's tensors on 2 MiB "
              "pages" + (f" (moved in the background in {bg:.1f} s)" if bg is not None else ""))
        if "huge" in args.paths:
            print(f"engine[huge]: {res['huge_page_bytes'] / 2**20:.0f} MiB of the engine "
                  "copy's tensors on 2 MiB pages")
        print(f"{'path':42} {'GB/s':>6} {'limit':>6}  ratio min / med / max  "
              f"{'memcpy':>6}  ratio to memcpy")
        for name, rs in res["rows"].items():
            r = sorted(x["ratio"] for x in rs)
            q = sorted(x["memcpy_ratio"] for x in rs)
            print(f"{name:42} {statistics.median(x['gbps'] for x in rs):6.2f} "
                  f"{statistics.median(x['limit_gbps'] for x in rs):6.2f}  "
                  f"{r[0]:.2f} / {statistics.median(r):.2f} / {r[-1]:.2f}      "
                  f"{statistics.median(x['memcpy_gbps'] for x in rs):6.2f}  "
                  f"{q[0]:.2f} / {statistics.median(q):.2f} / {q[-1]:.2f}")
        print("limit: the fastest copy of the same bytes (memcpy or streaming stores, 1 or N "
              "threads), timed before each batch; memcpy: the fastest memcpy alone; "
              + ("cold: limit copies on a ring of "
                 f"{res['cache_ring_bytes'] / 2**20:.0f} MiB, cache flushed before each "
                 "figure" if res["limit_mode"] == "cold" else "warm: limit copies back to back"))
        print(f"verified {res['verified_blocks']} blocks, {res['mismatched_blocks']} mismatched")
    return 1 if res["mismatched_blocks"] else 0


if __name__ == "__main__":
    sys.exit(main())

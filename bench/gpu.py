"""Device ↔ host block transfers of kvbm_tiers_gpu beside a plain torch copy of the same bytes.

Model: Llama-3-8B's KV (32 layers, 8 KV heads, head_dim 128, bf16), 16-token pages,
so one block is 2 MiB. Two engine arrangements:

* ``2MiB blocks``: a fully contiguous pool (TensorRT-LLM's NHD pool, or our own) —
  each block is one 2 MiB region;
* ``vLLM layers``: vLLM's per-layer tensors ``[2, blocks, 16, 8, 128]`` — a block is 64
  scattered runs of 32 KiB (K and V of each layer);
* ``vLLM 0.33 layers``: vLLM 0.33's logical ``[blocks, 8, 16, K|V]`` per layer (heads
  outermost, K and V side by side per token) — a block is 8192 runs of 256 B.

For each: offload (device → host, ``copy_out``), onboard (host → device, ``copy_in``),
layer-wise onboard, with the ``gather`` and ``per_block`` strategies, and both
directions at once; beside the limit measured in the same run: one torch copy of the
batch's bytes between pinned host memory and the device (on CPU: between two host
tensors). Block ids are shuffled, as an engine's are. A sweep over run sizes shows
where ``gather`` starts to beat ``per_block`` (``gather_below_bytes``).

Without CUDA everything runs on CPU tensors and is labelled CPU; the GPU figures
need a CUDA machine. Run: ``python bench/gpu.py [--blocks 32] [--repeats 5] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvbm.layout import BlockLayout, ModelSpec, aligned_empty
from kvbm_tiers_gpu import DeviceBlocks, TransferConfig, register_kv_caches

BACKEND = "auto"  # --backend: auto (torch on CUDA, numpy on CPU), torch, numpy, cupy
LLAMA3_8B = ModelSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", name="llama-3-8b")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], object], dev: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def paired(case: Callable[[], object], plain: Callable[[], object], nbytes: int, repeats: int,
           dev: torch.device) -> dict[str, float]:
    """GB/s of ``case`` and of ``plain`` (the limit), timed in alternation.

    The machine may be shared: alternating the two and taking the median of the
    per-round ratios keeps a burst of someone else's load from landing on one side only.
    """
    case()  # warm-up: staging allocation, first-touch page faults, CUDA context
    plain()
    sync(dev)
    tc, tp, ratios = [], [], []
    for _ in range(repeats):
        p = timed(plain, dev)
        c = timed(case, dev)
        tp.append(p)
        tc.append(c)
        ratios.append(p / c)
    return {
        "gbps": nbytes / statistics.median(tc) / 1e9,
        "limit_gbps": nbytes / statistics.median(tp) / 1e9,
        "ratio": statistics.median(ratios),
        "best_gbps": nbytes / min(tc) / 1e9,
    }


def host_arena(nbytes: int, dev: torch.device) -> np.ndarray:
    """Pinned on CUDA (as the host tier's arena), page-aligned otherwise; touched."""
    if dev.type == "cuda":
        arr = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    else:
        arr = aligned_empty(nbytes)
    arr[::4096] = 1
    return arr


def engine_blocks(kind: str, layout: BlockLayout, nb: int, dev: torch.device,
                  cfg: TransferConfig) -> DeviceBlocks:
    m = layout.model
    if kind == "bhnc":
        kv = {f"layers.{i}": torch.ones(nb, m.num_kv_heads, layout.page_size,
                                        m.outer_dim * m.head_dim, dtype=torch.bfloat16, device=dev)
              for i in range(m.num_layers)}
        return register_kv_caches(kv, layout, num_blocks=nb, transfer=cfg)
    if kind == "pool":
        pool = torch.ones(nb, m.num_layers, m.outer_dim, layout.page_size * m.inner_dim,
                          dtype=torch.bfloat16, device=dev)
        return register_kv_caches(pool, layout, transfer=cfg)
    kv = [torch.ones(2, nb, layout.page_size, m.num_kv_heads, m.head_dim, dtype=torch.bfloat16,
                     device=dev) for _ in range(m.num_layers)]
    return register_kv_caches(kv, layout, transfer=cfg)


def plain_copy(nbytes: int, dev: torch.device) -> dict[str, Callable[[], None]]:
    """The limit: one torch copy of ``nbytes`` each way between pinned host memory and ``dev``."""
    pin = dev.type == "cuda"
    h_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    h_in = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
    d_src = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    d_dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    h_out.fill_(0)

    def d2h() -> None:
        h_out.copy_(d_src, non_blocking=pin)

    def h2d() -> None:
        d_dst.copy_(h_in, non_blocking=pin)

    if pin:
        s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

        def both() -> None:
            with torch.cuda.stream(s1):
                d2h()
            with torch.cuda.stream(s2):
                h2d()
    else:
        def both() -> None:
            t = threading.Thread(target=d2h)
            t.start()
            h2d()
            t.join()
    return {"d2h": d2h, "h2d": h2d, "both": both}


def measure(kind: str, layout: BlockLayout, n: int, dev: torch.device, repeats: int,
            strategy: str, plain: dict[str, Callable[[], None]],
            bidir: bool = True) -> dict[str, dict[str, float]]:
    cfg = TransferConfig(strategy=strategy, copy_backend=BACKEND)  # type: ignore[arg-type]
    nb = 2 * n
    bb = layout.bytes_per_block
    src = engine_blocks(kind, layout, nb, dev, cfg)
    dst = engine_blocks(kind, layout, nb, dev, cfg)
    arena = host_arena(2 * n * bb, dev).reshape(2 * n, bb)
    rng = random.Random(0)
    ids_out = rng.sample(range(nb), n)
    ids_in = rng.sample(range(nb), n)
    slots = rng.sample(range(n), n)
    views_out = [arena[s] for s in slots]
    views_in = [arena[n + s] for s in slots]
    total = n * bb

    def out() -> None:
        src.copy_out(ids_out, views_out)

    def inn() -> None:
        dst.copy_in(ids_in, views_in)

    def layerwise() -> None:
        dst.onboard_layerwise(ids_in, views_in).wait()

    def both() -> None:
        t = threading.Thread(target=out)
        t.start()
        inn()
        t.join()

    res = {
        "d2h": paired(out, plain["d2h"], total, repeats, dev),
        "h2d": paired(inn, plain["h2d"], total, repeats, dev),
    }
    if bidir:
        res["h2d_layerwise"] = paired(layerwise, plain["h2d"], total, repeats, dev)
        res["bidir"] = paired(both, plain["both"], 2 * total, repeats, dev)
    src.close()
    dst.close()
    return res


def crossover(dev: torch.device, nbytes: int, repeats: int,
              max_copies: int = 0) -> list[dict[str, Any]]:
    """gather vs per_block for vLLM layers as the run (page × 8 heads × 128 × 2 B) grows."""
    rows = []
    for page in (1, 4, 16, 64):
        layout = BlockLayout(ModelSpec(8, 8, 128, "bfloat16"), page)
        n = max(2, nbytes // layout.bytes_per_block)
        plain = plain_copy(n * layout.bytes_per_block, dev)
        row: dict[str, Any] = {"run_bytes": page * 8 * 128 * 2, "blocks": n}
        for strategy in ("gather", "per_block"):
            copies = n * layout.model.num_layers * 2
            if strategy == "per_block" and max_copies and copies > max_copies:
                row[strategy] = None  # too many launches to time in a short run
                continue
            r = measure("vllm", layout, n, dev, repeats, strategy, plain, bidir=False)
            row[strategy] = {"d2h_ratio": r["d2h"]["ratio"], "h2d_ratio": r["h2d"]["ratio"]}
        rows.append(row)
    return rows


COLS = (("d2h", "D2H"), ("h2d", "H2D"), ("h2d_layerwise", "H2D layerwise"), ("bidir", "both ways"))


def header(results: dict[str, Any], label: str, dev: torch.device) -> None:
    """The table's head, printed before the first case so a cut-short run still says something."""
    n, bb, total = results["blocks"], results["block_bytes"], results["batch_bytes"]
    print(f"kvbm_tiers_gpu transfers on {label}: {n} blocks of {bb / 2**20:.0f} MiB per batch "
          f"({total / 2**20:.0f} MiB); median of {results['repeats']} rounds, each timing the "
          f"limit then the case; copy backend {results['copy_backend']}")
    if dev.type != "cuda":
        print("  ** CPU tensors: the 'device' is host memory; GPU figures are pending a CUDA machine **")
    lim = "one torch copy, pinned host <-> device" if dev.type == "cuda" else "one torch copy, host -> host"
    print(f"  limit = {lim}, same bytes, same rounds")
    print(f"  {'case':30s}" + "".join(f" {h:>22s}" for _, h in COLS))
    print(f"  {'':30s}" + " {:>22s}".format("GB/s / limit = ratio") * len(COLS), flush=True)


def row(case: str, r: dict[str, dict[str, float]]) -> None:
    cells = "".join(f" {r[k]['gbps']:7.2f}/{r[k]['limit_gbps']:6.2f} ={r[k]['ratio']:5.2f}"
                    for k, _ in COLS)
    print(f"  {case:30s}{cells}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=None,
                    help="blocks per batch (default 128 on CUDA, 64 on CPU)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--no-sweep", action="store_true", help="skip the run-size sweep")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: on a shared machine an OpenMP "
                         "region waits for a descheduled core, which swamps the copy)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numpy", "cupy"],
                    help="copy backend of the per-block copies")
    ap.add_argument("--max-copies", type=int, default=None,
                    help="skip per_block where a batch needs more copies than this (default "
                         "20000 on CUDA, where each copy is a launch of a few microseconds: "
                         "vLLM 0.33's 256-byte runs are a million copies a batch; 0: no limit)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--json-out", default=None,
                    help="also write the JSON to this file after every case")
    a = ap.parse_args()
    global BACKEND
    BACKEND = a.backend
    if a.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(a.device)
    if a.threads or dev.type == "cpu":
        torch.set_num_threads(a.threads or 1)
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU tensors (no CUDA)"
    n = a.blocks or (128 if dev.type == "cuda" else 64)
    if a.max_copies is None:
        a.max_copies = 20000 if dev.type == "cuda" else 0
    layout = BlockLayout(LLAMA3_8B, 16)
    total = n * layout.bytes_per_block
    plain = plain_copy(total, dev)
    results: dict[str, Any] = {
        "device": str(dev), "device_name": label, "blocks": n,
        "block_bytes": layout.bytes_per_block, "batch_bytes": total, "repeats": a.repeats,
        "copy_backend": a.backend, "max_copies": a.max_copies,
        "torch_threads": torch.get_num_threads(), "cases": {}, "skipped": {},
    }
    show = not a.json
    if show:
        header(results, label, dev)

    def save() -> None:
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump(results, f, indent=2)

    m = layout.model
    run_bytes = {"pool": layout.bytes_per_block, "vllm": layout.page_size * m.inner_dim * 2,
                 "bhnc": m.head_dim * 2}
    for kind, name in (("pool", "2MiB blocks"), ("vllm", "vLLM layers"),
                       ("bhnc", "vLLM 0.33 layers")):
        copies = n * layout.bytes_per_block // run_bytes[kind]
        for strategy in ("auto", "gather", "direct", "per_block"):
            case = f"{name} / {strategy}"
            if strategy == "per_block" and a.max_copies and copies > a.max_copies:
                why = (f"{copies} copies of {run_bytes[kind]} B per batch (> --max-copies "
                       f"{a.max_copies}); auto gathers runs this small")
                results["skipped"][case] = why
                save()
                if show:
                    print(f"  {case:30s} skipped: {why}", flush=True)
                continue
            results["cases"][case] = r = measure(kind, layout, n, dev, a.repeats, strategy, plain)
            save()
            if show:
                row(case, r)
    if not a.no_sweep:
        results["sweep"] = crossover(dev, 8 * 2**20 if dev.type == "cpu" else 64 * 2**20,
                                     a.repeats, a.max_copies)
        save()
    if dev.type != "cuda":
        results["note"] = "CPU tensors: GPU figures pending a CUDA machine"
    save()
    if a.json:
        print(json.dumps(results, indent=2))
        return
    if "sweep" in results:
        print("  run-size sweep, vLLM layers (8 layers, 8 heads, hd 128), ratio to the limit:")
        print(f"  {'run bytes':>10s} {'gather D2H/H2D':>16s} {'per_block D2H/H2D':>18s}  faster")
        for r in results["sweep"]:
            g, p = r["gather"], r["per_block"]
            if p is None:
                print(f"  {r['run_bytes']:10d} {g['d2h_ratio']:7.2f}/{g['h2d_ratio']:<8.2f}"
                      f" {'skipped':>18s}  gather")
                continue
            faster = "gather" if g["d2h_ratio"] + g["h2d_ratio"] > p["d2h_ratio"] + p["h2d_ratio"] else "per_block"
            print(f"  {r['run_bytes']:10d} {g['d2h_ratio']:7.2f}/{g['h2d_ratio']:<8.2f}"
                  f" {p['d2h_ratio']:9.2f}/{p['h2d_ratio']:<8.2f}  {faster}")

if __name__ == "__main__":
    main()

"""The bench: replay the multi-turn workload against a chain and measure it.

The engine side is held as per-layer CPU tensors shaped as vLLM allocates them
(``[2, num_blocks, page, heads, head_dim]``), so offload and onboard go through the
layer-separate views. Each block's content is a pattern derived from its sequence
hash, so every onboarded block is checked byte for byte against what was offloaded.
A second phase moves contiguous 2 MiB blocks in batches through the first tier and
compares the rate with a memory copy measured in the same run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm.config import KvbmSettings, load_settings
from kvbm.engine_blocks import engine_blocks
from kvbm.layout import ContiguousBlocks
from kvbm.manager import KvBlockManager

from .config import BenchOptions, default_settings
from .limits import dd_direct_gbps, memcpy_gbps
from .workload import multi_turn_workload


@dataclass
class BenchReport:
    """Everything the bench measured."""

    chain: list[str]
    turns: int = 0
    prompt_blocks: int = 0
    matched_blocks: int = 0
    matched_by_tier: dict[str, int] = field(default_factory=dict)
    verified_blocks: int = 0
    mismatched_blocks: int = 0
    match_ms: list[float] = field(default_factory=list)
    onboard_ms: list[float] = field(default_factory=list)
    paths: dict[str, dict[str, Any]] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Matched blocks over prompt blocks."""
        return self.matched_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as ``kvbm bench --json`` prints it (latencies as p50/p99)."""
        def pct(xs: list[float], q: float) -> float:
            return float(np.percentile(xs, q)) if xs else 0.0

        return {
            "chain": self.chain,
            "turns": self.turns,
            "prompt_blocks": self.prompt_blocks,
            "matched_blocks": self.matched_blocks,
            "matched_by_tier": self.matched_by_tier,
            "hit_rate": self.hit_rate,
            "verified_blocks": self.verified_blocks,
            "mismatched_blocks": self.mismatched_blocks,
            "match_ms": {"p50": pct(self.match_ms, 50), "p99": pct(self.match_ms, 99)},
            "onboard_ms": {"p50": pct(self.onboard_ms, 50), "p99": pct(self.onboard_ms, 99)},
            "paths": self.paths,
            "limits": self.limits,
            "seconds": self.seconds,
        }


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.enabled = enabled and sys.stderr.isatty() or enabled == "force"  # type: ignore[comparison-overlap]
        self.n = 0
        self.t0 = time.perf_counter()

    def step(self, text: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        frac = self.n / self.total
        bar = "#" * int(frac * 30)
        el = time.perf_counter() - self.t0
        sys.stderr.write(f"\r[{bar:<30}] {self.n}/{self.total} {el:5.1f}s {text:<40}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _pattern_fn(bb: int, seed: int) -> Any:
    noise = np.random.default_rng(seed).integers(0, 256, bb, dtype=np.uint8)

    def pattern(h: bytes, out: np.ndarray) -> np.ndarray:
        # Position-dependent noise XOR the block's hash: a block swapped with another,
        # a layer out of place or a torn half all differ from the expected bytes.
        np.bitwise_xor(noise, np.frombuffer(h * (bb // 16), dtype=np.uint8), out=out[: bb // 16 * 16])
        return out

    return pattern


def run_bench(opts: BenchOptions) -> BenchReport:
    """Run the workload phase and the contiguous 2 MiB phase; return the report."""
    import torch

    tmpdir = tempfile.mkdtemp(prefix="kvbm-bench-")
    try:
        config: Any = opts.config if opts.config else default_settings(tmpdir)
        settings: KvbmSettings = load_settings(config)
        mgr = KvBlockManager.from_config(settings)
        report = BenchReport(chain=[f"{rt.name}:{rt.config.type}" for rt in mgr.chain])
        # A tier on local disk gets dd's O_DIRECT rate as its limit, whatever its type.
        disk_dirs = {rt.name: _first_dir(rt.config) for rt in mgr.chain
                     if getattr(type(rt.tier), "medium", None) == "DISK"}
        try:
            _workload_phase(mgr, opts, report, torch)
        finally:
            mgr.close()
        _contiguous_phase(settings, opts, report)
        report.limits["memcpy_1t_gbps"] = memcpy_gbps(threads=1)
        for name, d in disk_dirs.items():
            if d:
                w, r = dd_direct_gbps(d)
                report.limits[f"dd_write:{name}"] = w
                report.limits[f"dd_read:{name}"] = r
        _attach_limits(report)
        return report
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _workload_phase(mgr: KvBlockManager, opts: BenchOptions, report: BenchReport, torch: Any) -> None:
    layout = mgr.layout
    m = layout.model
    bb = layout.bytes_per_block
    turns = list(multi_turn_workload(opts.users, opts.rounds, opts.system_tokens, seed=opts.seed))
    max_blocks = max(len(t.tokens) for t in turns) // layout.page_size + 1
    dtype = getattr(torch, m.dtype)
    kv = [torch.zeros(m.outer_dim, max_blocks, layout.page_size, m.num_kv_heads, m.head_dim, dtype=dtype)
          for _ in range(m.num_layers)]
    # The one engine adapter the vLLM worker and the GPU tier use too (a plugin's
    # accelerated class for device tensors, the core's for these CPU ones).
    engine: Any = engine_blocks(kv, layout, plugins=mgr.plugins)
    pattern = _pattern_fn(bb, opts.seed)
    want = np.empty(bb, dtype=np.uint8)
    got = [np.empty(bb, dtype=np.uint8) for _ in range(max_blocks)]
    bar = _Progress(len(turns), opts.progress)
    t_start = time.perf_counter()
    samples: list[float] = []
    threads = mgr.settings.copy_threads
    probe_src = np.ones(64 * 2**20, dtype=np.uint8)
    probe_dst = np.ones(64 * 2**20, dtype=np.uint8)  # touched: a sample times copying, not faults
    probe_pool = ThreadPoolExecutor(max(1, threads - 1))
    for k, turn in enumerate(turns):
        if time.perf_counter() - t_start > opts.duration:
            break
        if k % 8 == 0:
            # Memory bandwidth here moves with the VM's neighbours: sample the limit
            # through the run and take the median, not one moment after it.
            secs = _plain_copy(probe_dst, probe_src, threads, probe_pool)
            samples.append(probe_src.nbytes / secs / 1e9)
        hashes = mgr.hash_tokens(turn.tokens)
        t0 = time.perf_counter()
        match = mgr.match_prefix(hashes)
        report.match_ms.append((time.perf_counter() - t0) * 1e3)
        with match:
            n = match.num_blocks
            if n:
                t0 = time.perf_counter()
                res = mgr.onboard(match, engine, indices=list(range(n)))
                report.onboard_ms.append((time.perf_counter() - t0) * 1e3)
                n = res.loaded
                for t in match.tiers[:n]:
                    report.matched_by_tier[t] = report.matched_by_tier.get(t, 0) + 1
                engine.copy_out(list(range(n)), got[:n])
                for b in range(n):
                    if np.array_equal(got[b], pattern(hashes[b], want)):
                        report.verified_blocks += 1
                    else:
                        report.mismatched_blocks += 1
        report.turns += 1
        report.prompt_blocks += len(hashes)
        report.matched_blocks += n
        # "Prefill" the rest: write each new block's pattern into the engine tensors.
        for b in range(n, len(hashes)):
            engine.copy_in([b], [pattern(hashes[b], want)])
        # As an engine does when a request finishes, offer every complete block: the
        # ones the first tier holds are not copied again, only re-offered below.
        mgr.offload(hashes, engine, indices=list(range(len(hashes))))
        bar.step(f"user {turn.user} round {turn.round} hit {n}/{len(hashes)}")
    mgr.flush()
    bar.done()
    report.seconds = time.perf_counter() - t_start
    probe_pool.shutdown()
    report.limits["memcpy_gbps"] = float(np.median(samples)) if samples else 0.0
    for name, st in mgr.stats()["paths"].items():
        report.paths[name] = {k: st[k] for k in ("blocks", "bytes", "seconds", "gbps", "failures")}


def _contiguous_phase(settings: KvbmSettings, opts: BenchOptions, report: BenchReport) -> None:
    """Batches of whole 2 MiB blocks through a fresh first tier alone.

    Memory bandwidth on a shared VM swings by 2x from one moment to the next, so
    each batch is timed right after a plain copy of the same bytes with the same
    number of threads; the sum of those copies is this phase's limit.
    """
    first = settings.tiers[0].model_dump()
    first.pop("capacity", None)
    first["num_blocks"] = opts.raw_blocks
    s = settings.model_copy(update={"tiers": [type(settings.tiers[0])(**first)]})
    mgr = KvBlockManager.from_config(s)
    threads = settings.copy_threads
    pool = ThreadPoolExecutor(max(1, threads - 1))
    try:
        bb = mgr.block_bytes
        rng = np.random.default_rng(opts.seed + 1)
        n = opts.raw_blocks
        batch = min(opts.raw_batch, n)
        src = rng.integers(0, 256, (batch, bb), dtype=np.uint8)
        dst = np.zeros_like(src)
        scratch = np.zeros_like(src)
        tokens = rng.integers(0, 32000, n * mgr.page_size, dtype=np.uint32)
        hashes = mgr.hash_tokens(tokens)
        cs, cd = ContiguousBlocks(src, mgr.layout), ContiguousBlocks(dst, mgr.layout)
        t_off = t_on = lim_off = lim_on = 0.0
        moved_off = moved_on = 0
        for i in range(0, n, batch):
            hs = hashes[i : i + batch]
            src[: len(hs), :16] = np.frombuffer(b"".join(hs), dtype=np.uint8).reshape(len(hs), 16)
            lim_off += _plain_copy(scratch[: len(hs)], src[: len(hs)], threads, pool)
            t0 = time.perf_counter()
            moved_off += mgr.offload(hs, cs).stored
            t_off += time.perf_counter() - t0
        mgr.flush()
        match = mgr.match_prefix(hashes)
        with match:
            for i in range(0, match.num_blocks, batch):
                sub = _sub_match(match, i, batch)
                k = len(sub.hashes)
                lim_on += _plain_copy(scratch[:k], dst[:k], threads, pool)
                t0 = time.perf_counter()
                moved_on += mgr.onboard(sub, cd).loaded
                t_on += time.perf_counter() - t0
                ok = all(bytes(dst[j, :16]) == hashes[i + j] for j in range(k))
                if not ok:
                    report.mismatched_blocks += 1
        tier = mgr.chain[0].name
        for op, moved, t, lim in (("offload", moved_off, t_off, lim_off), ("onboard", moved_on, t_on, lim_on)):
            report.paths[f"{op}:{tier}[2MiB-contiguous]"] = {
                "blocks": moved, "bytes": moved * bb, "seconds": t,
                "gbps": moved * bb / t / 1e9 if t else 0.0, "failures": 0,
                "limit_gbps": moved * bb / lim / 1e9 if lim else 0.0,
                "limit": f"memcpy, {threads} threads, interleaved"}
    finally:
        pool.shutdown()
        mgr.close()


def _plain_copy(dst: np.ndarray, src: np.ndarray, threads: int, pool: ThreadPoolExecutor) -> float:
    """Seconds to copy ``src`` into ``dst`` split across ``threads``, as the manager does."""
    k = len(src)
    step = -(-k // threads)
    t0 = time.perf_counter()
    futs = [pool.submit(np.copyto, dst[j : j + step], src[j : j + step]) for j in range(step, k, step)]
    np.copyto(dst[:step], src[:step])
    for f in futs:
        f.result()
    return time.perf_counter() - t0


def _sub_match(match: Any, start: int, n: int) -> Any:
    """A view of ``n`` blocks of a pinned match (the pins stay with the parent)."""
    return match.part(start, n)


def _first_dir(config: Any) -> str | None:
    path = getattr(config, "path", None)
    if isinstance(path, (list, tuple)):
        path = path[0] if path else None
    return str(path) if path else None


def _attach_limits(report: BenchReport) -> None:
    """Each path's denominator: dd O_DIRECT for a disk tier, memory copy otherwise.

    An S3 or remote tier's limit (raw boto3, raw NIXL against the same peer) is
    measured by its own bench (bench/s3.py, bench/remote.py); here it is memory copy.
    """
    for name, p in report.paths.items():
        if "limit_gbps" in p:  # measured with the path itself (the contiguous phase)
            p["ratio"] = p["gbps"] / p["limit_gbps"] if p["limit_gbps"] else 0.0
            continue
        op, _, tier = name.partition(":")
        tier = tier.split("[", 1)[0]
        key = f"dd_{'write' if op == 'offload' else 'read'}:{tier}"
        if report.limits.get(key):
            p["limit_gbps"], p["limit"] = report.limits[key], "dd O_DIRECT"
        else:
            p["limit_gbps"], p["limit"] = report.limits["memcpy_gbps"], "memcpy"
        p["ratio"] = p["gbps"] / p["limit_gbps"] if p["limit_gbps"] else 0.0


def format_report(r: BenchReport) -> str:
    """The human summary table."""
    j = r.to_json()
    lines = [
        f"chain: {' -> '.join(r.chain)}",
        f"turns {r.turns} in {r.seconds:.1f}s; prompt blocks {r.prompt_blocks}; "
        f"matched {r.matched_blocks} (hit rate {r.hit_rate:.1%}; by tier "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.matched_by_tier.items())) + ")",
        f"verified blocks {r.verified_blocks}, mismatched {r.mismatched_blocks}",
        f"match   p50 {j['match_ms']['p50']:.3f} ms  p99 {j['match_ms']['p99']:.3f} ms",
        f"onboard p50 {j['onboard_ms']['p50']:.2f} ms  p99 {j['onboard_ms']['p99']:.2f} ms",
        f"memory copy (same run): {r.limits['memcpy_gbps']:.2f} GB/s with the manager's copy "
        f"threads (median through the workload), {r.limits['memcpy_1t_gbps']:.2f} GB/s with one",
        "",
        f"{'path':<34}{'blocks':>8}{'GB':>9}{'GB/s':>9}{'limit':>9}{'ratio':>8}{'fail':>6}  limit is",
    ]
    for name, p in sorted(r.paths.items()):
        lines.append(
            f"{name:<34}{p['blocks']:>8}{p['bytes'] / 1e9:>9.2f}{p['gbps']:>9.2f}"
            f"{p['limit_gbps']:>9.2f}{p['ratio']:>8.2f}{p['failures']:>6}  {p['limit']}"
        )
    return "\n".join(lines)


def environment_note() -> str:
    """One line on the machine, for the report header."""
    return f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"

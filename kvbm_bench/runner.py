"""The bench: replay the multi-turn workload against a chain and measure it.

The engine side is held as per-layer CPU tensors shaped as vLLM allocates them
(``[2, num_blocks, page, heads, head_dim]``), so offload and onboard go through the
layer-separate views; without torch, as numpy arrays of the same bytes
(``engine_np``). Each block's content is a pattern derived from its sequence hash, so
every onboarded block is checked byte for byte against what was offloaded. A second
phase moves contiguous whole blocks in batches through the first tier. Last, every
tier's own limit is measured (``limits``): memory copy, dd, raw boto3; fio on a disk
tier is sampled between parts of the workload instead, each part's disk figures paired
with the samples right around it (``diskpair``).
Every phase reports progress with an ETA (``progress``).
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
from kvbm.layout import ContiguousBlocks, aligned_empty
from kvbm.manager import KvBlockManager

from .config import BenchOptions, default_settings
from .diskpair import SEGMENTS, DiskPairs
from .limits import (
    best_copy,
    dd_direct_gbps,
    find_fio,
    fio_gbps,
    memcpy_best,
    nixl_importable,
    remote_raw_read_gbps,
    s3_raw_gbps,
    split_copy,
)
from .mempair import MemPairs
from .progress import Progress
from .remotepair import RemoteSamples, read_then_copy_gbps
from .s3pair import PathClock
from .s3pair import add_rows as add_s3_rows
from .workload import multi_turn_workload

PHASES = ["setup", "workload", "contiguous", "limits"]


def block_label(nbytes: int) -> str:
    """A block size as the table's path label shows it: ``2MiB``, ``160KiB``, ``1000B``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    if nbytes >= 1 << 20:
        return f"{nbytes / 2**20:.2f}MiB"
    return f"{nbytes / 2**10:.1f}KiB" if nbytes >= 1 << 10 else f"{nbytes}B"


def tier_kind(type_name: str, config: Any) -> str:
    """Which limit a tier gets: ``s3``, ``remote``, ``disk`` (a local directory) or ``memory``."""
    if type_name == "s3":
        return "s3"
    if type_name == "remote":
        return "remote"
    if _first_dir(config):
        return "disk"
    return "memory"


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
    limit_notes: dict[str, str] = field(default_factory=dict)
    engine: str = "torch"
    block_bytes: int = 0
    seconds: float = 0.0
    #: The memory paths' figures paired with the limit samples around them (``mempair``).
    mem_pairs: MemPairs = field(default_factory=MemPairs)
    #: A remote tier's raw READ sampled around the workload's windows (``remotepair``).
    remote_samples: RemoteSamples | None = None

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
            "limit_notes": self.limit_notes,
            "engine": self.engine,
            "block_bytes": self.block_bytes,
            "seconds": self.seconds,
        }


def _pattern_fn(bb: int, seed: int) -> Any:
    noise = np.random.default_rng(seed).integers(0, 256, bb, dtype=np.uint8)

    def pattern(h: bytes, out: np.ndarray) -> np.ndarray:
        # Position-dependent noise XOR the block's hash: a block swapped with another,
        # a layer out of place or a torn half all differ from the expected bytes.
        np.bitwise_xor(noise, np.frombuffer(h * (bb // 16), dtype=np.uint8), out=out[: bb // 16 * 16])
        return out

    return pattern


def _torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> BenchReport:
    """Run the workload, the contiguous phase and every tier's limit; return the report."""
    bar = progress if progress is not None else Progress(PHASES, opts.progress)
    bar.phase("setup", 3, text="loading the chain")
    torch = _torch_or_none()
    tmpdir = tempfile.mkdtemp(prefix="kvbm-bench-")
    try:
        config: Any = opts.config if opts.config else default_settings(tmpdir)
        settings: KvbmSettings = load_settings(config)
        bar.step("building the chain")
        mgr = KvBlockManager.from_config(settings)
        bar.step("chain built")
        report = BenchReport(chain=[f"{rt.name}:{rt.config.type}" for rt in mgr.chain],
                             engine="torch" if torch is not None else "numpy (torch not installed)",
                             block_bytes=mgr.block_bytes)
        tiers = {rt.name: (str(rt.config.type), rt.config) for rt in mgr.chain}
        kinds = {name: tier_kind(t, c) for name, (t, c) in tiers.items()}
        s3_tiers = [name for name, k in kinds.items() if k == "s3"]
        clock = PathClock(mgr.executor, s3_tiers) if s3_tiers else None
        bar.estimate("workload", opts.duration)
        bar.estimate("contiguous", 2 * opts.raw_blocks * mgr.block_bytes / 0.5e9)
        fio = find_fio()
        disks = {name: (d, int(getattr(c, "io_threads", 1) or 1)) for name, (_, c) in tiers.items()
                 if kinds[name] == "disk" and (d := _first_dir(c)) is not None}
        pairs = DiskPairs(fio, disks, opts.limit_bytes, mgr.block_bytes) if fio and disks else None
        bar.estimate("limits", 2 + sum({"disk": 4 if pairs else 8, "s3": 4}.get(k, 0)
                                       for k in kinds.values()))
        try:
            _workload_phase(mgr, opts, report, torch, bar, pairs)
        finally:
            mgr.close()
        first_kind = kinds[mgr.chain[0].name]
        _contiguous_phase(settings, opts, report, bar, first_kind)
        _limits_phase(report, tiers, kinds, settings.copy_threads, bar, opts.limit_bytes, pairs)
        add_s3_rows(report, clock, s3_tiers)  # both ways on one server (s3pair)
        _attach_limits(report, kinds, pairs)
        bar.done()
        return report
    finally:
        bar.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _limits_phase(report: BenchReport, tiers: dict[str, tuple[str, Any]], kinds: dict[str, str],
                  threads: int, bar: Progress, nbytes: int, pairs: DiskPairs | None = None) -> None:
    """Each tier's own limit, measured now, in this run (one progress step each); a disk
    tier's fio from its samples between the workload's parts where ``pairs`` has them."""
    steps = 1 + sum({"disk": 2, "s3": 1}.get(k, 0) for k in kinds.values())
    bar.phase("limits", steps, text=f"memory copy, 1 and {threads} threads")
    mc = memcpy_best(min(256 * 2**20, nbytes), threads=threads)
    report.limits["memcpy_1t_gbps"] = mc.one_thread_gbps
    report.limits["memcpy_nt_gbps"] = mc.n_threads_gbps
    report.limits["memcpy_threads"] = float(mc.threads)
    bar.step("memory copy measured")
    fio = find_fio()
    sampled = pairs.limits() if pairs is not None else {}
    report.limits.update(sampled)
    for name, (_, cfg) in tiers.items():
        kind = kinds[name]
        if kind == "disk":
            d = _first_dir(cfg)
            assert d is not None
            jobs = int(getattr(cfg, "io_threads", 1) or 1)
            bar.text = f"fio on {name} ({jobs} jobs)"
            got = None
            if f"fio_write:{name}" in sampled:
                pass  # sampled around the workload's parts
            elif fio:
                got = fio_gbps(d, jobs, nbytes, fio=fio)
            if got is not None:
                report.limits[f"fio_write:{name}"], report.limits[f"fio_read:{name}"] = got
                report.limits[f"fio_jobs:{name}"] = float(jobs)
            elif f"fio_write:{name}" not in sampled:
                report.limit_notes[name] = ("no fio (run `make fio`): dd is the limit" if fio is None
                                            else "fio failed in this directory: dd is the limit")
            bar.step(f"dd on {name}")
            w, r = dd_direct_gbps(d, nbytes, repeats=2)
            report.limits[f"dd_write:{name}"], report.limits[f"dd_read:{name}"] = w, r
            bar.step(f"{name} measured")
        elif kind == "s3":
            bar.text = f"raw boto3 on {name}'s server"
            c = int(getattr(cfg, "max_concurrency", 16))
            try:
                put, get = s3_raw_gbps(cfg, c, report.block_bytes)
                report.limits[f"boto3_put:{name}"], report.limits[f"boto3_get:{name}"] = put, get
                report.limits[f"boto3_threads:{name}"] = float(c)
            except Exception as e:  # the tier's own figure stands; its limit is unknown
                report.limit_notes[name] = f"raw boto3 failed: {type(e).__name__}: {str(e)[:80]}"
            bar.step(f"{name} measured")
        elif kind == "remote" and f"nixl_read:{name}" not in report.limits:
            report.limit_notes.setdefault(name, "no limit: NIXL is not importable"
                                          if not nixl_importable() else "no limit: not measured")


def _fio_boundary(mgr: KvBlockManager, pairs: DiskPairs, bar: Progress) -> float:
    """Flush the cascade, then sample fio on each disk tier (``DiskPairs.boundary``);
    returns the seconds fio took (kept off the workload's clock; the flush is not)."""
    bar.text = "flushing writes to the lower tiers"
    mgr.flush()
    bar.text = "fio on the disk tiers, between parts of the workload"
    t0 = time.perf_counter()
    st = mgr.stats()
    pairs.boundary(st["paths"], st["tiers"])
    return time.perf_counter() - t0


def _workload_phase(mgr: KvBlockManager, opts: BenchOptions, report: BenchReport, torch: Any,
                    bar: Progress, pairs: DiskPairs | None = None) -> None:
    layout = mgr.layout
    m = layout.model
    bb = layout.bytes_per_block
    turns = list(multi_turn_workload(opts.users, opts.rounds, opts.system_tokens, seed=opts.seed))
    max_blocks = max(len(t.tokens) for t in turns) // layout.page_size + 1
    bar.step(f"engine buffers ({report.engine})")
    engine: Any
    if torch is not None:
        from kvbm.engine_blocks import engine_blocks

        dtype = getattr(torch, m.dtype)
        kv = [torch.zeros(m.outer_dim, max_blocks, layout.page_size, m.num_kv_heads, m.head_dim,
                          dtype=dtype) for _ in range(m.num_layers)]
        # The one engine adapter the vLLM worker and the GPU tier use too (a plugin's
        # accelerated class for device tensors, the core's for these CPU ones).
        engine = engine_blocks(kv, layout, plugins=mgr.plugins,
                               huge_pages=mgr.settings.engine_huge_pages)
    else:
        from .engine_np import NumpyEngineBlocks

        engine = NumpyEngineBlocks(layout, max_blocks)
    pattern = _pattern_fn(bb, opts.seed)
    want = np.empty(bb, dtype=np.uint8)
    got = [np.empty(bb, dtype=np.uint8) for _ in range(max_blocks)]
    bar.phase("workload", len(turns), deadline_s=opts.duration)
    # fio samples on the disk tiers before the first turn, between SEGMENTS parts and
    # after the last (``diskpair``): their seconds are not the workload's.
    part = max(1, -(-len(turns) // SEGMENTS))
    if pairs is not None:
        _fio_boundary(mgr, pairs, bar)
    paused = 0.0
    t_start = time.perf_counter()
    samples: list[float] = []
    threads = mgr.settings.copy_threads
    probe_src = np.ones((8 * max(1, threads), 64 * 2**20 // (8 * max(1, threads))), dtype=np.uint8)
    probe_dst = np.ones_like(probe_src)  # touched: a sample times copying, not faults
    probe_pool = ThreadPoolExecutor(max(1, threads - 1))
    remote = {rt.name: rt.tier for rt in mgr.chain if str(rt.config.type) == "remote"}
    remote_keys: dict[str, list[bytes]] = {name: [] for name in remote}
    report.remote_samples = rs = RemoteSamples(remote, bb)
    for k, turn in enumerate(turns):
        if time.perf_counter() - t_start - paused > opts.duration:
            break
        if pairs is not None and k and k % part == 0:
            paused += _fio_boundary(mgr, pairs, bar)
        if k % 8 == 0:
            # Memory bandwidth here moves with the VM's neighbours: sample the limit
            # (the better of 1 and N threads) through the run and take the median.
            secs = best_copy(probe_dst, probe_src, threads, probe_pool)
            samples.append(probe_src.nbytes / secs / 1e9)
            report.mem_pairs.sample(samples[-1], mgr.executor.stats()["paths"])
        hashes = mgr.hash_tokens(turn.tokens)
        if remote and k % 8 == 0:  # the raw READ at the same moments (not the workload's time)
            paused += rs.sample(remote_keys, mgr.executor.stats()["paths"])
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
                for t, h in zip(match.tiers[:n], hashes[:n]):
                    report.matched_by_tier[t] = report.matched_by_tier.get(t, 0) + 1
                    if t in remote_keys:  # the last 64 blocks read from each peer tier
                        remote_keys[t] = [*remote_keys[t][-63:], h]
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
    # The last window's limit sample, after its turns (its figures are paired with it).
    samples.append(probe_src.nbytes / best_copy(probe_dst, probe_src, threads, probe_pool) / 1e9)
    report.mem_pairs.sample(samples[-1], mgr.executor.stats()["paths"])
    if remote:
        paused += rs.sample(remote_keys, mgr.executor.stats()["paths"])
    bar.text = "flushing writes to the lower tiers"
    mgr.flush()
    report.seconds = time.perf_counter() - t_start - paused
    if pairs is not None:
        _fio_boundary(mgr, pairs, bar)
    probe_pool.shutdown()
    for name, tier in remote.items():
        # The remote tier's limit needs its live peer and the manager: measured here.
        if not remote_keys[name]:
            report.limit_notes[name] = "no limit: no block was read from a peer"
            continue
        bar.text = f"raw NIXL READ from {name}'s peer"
        bufs = [aligned_empty(bb) for _ in remote_keys[name]]
        try:
            report.limits[f"nixl_read:{name}"] = remote_raw_read_gbps(tier, remote_keys[name], bufs)
            report.limits[f"nixl_read_copy:{name}"] = read_then_copy_gbps(  # (remotepair)
                report.limits[f"nixl_read:{name}"], engine, bufs, max_blocks)
        except Exception as e:  # the tier's own figure stands; its limit is unknown
            report.limit_notes[name] = f"no limit: raw NIXL READ failed: {type(e).__name__}: {str(e)[:80]}"
    report.limits["memcpy_gbps"] = float(np.median(samples)) if samples else 0.0
    stats = mgr.stats()
    for name, st in stats["paths"].items():
        report.paths[name] = {k: st[k] for k in ("blocks", "bytes", "seconds", "gbps", "failures")}
    _count_only_uploaded(report, stats["tiers"])


def _count_only_uploaded(report: BenchReport, tiers: dict[str, dict[str, Any]]) -> None:
    """An object store skips a block its server already holds (a conditional put): those
    bytes never crossed the wire, so an offload path to it counts only what it uploaded
    (the tier's ``put_bytes``) over the path's whole time, and a note says how much was
    skipped."""
    for name, ts in tiers.items():
        p = report.paths.get(f"offload:{name}")
        sent = ts.get("put_bytes")
        if p is None or not isinstance(sent, int) or sent >= p["bytes"]:
            continue
        skipped = p["bytes"] - sent
        p["skipped_bytes"] = skipped
        p["bytes"] = sent
        p["gbps"] = sent / p["seconds"] / 1e9 if p["seconds"] > 0 else 0.0
        before = report.limit_notes.get(name)
        report.limit_notes[name] = (f"{before}; " if before else "") + (
            f"{skipped / 1e9:.2f} GB of its offload was already on the server (not uploaded): "
            "offload counts only the bytes sent")


def _contiguous_phase(settings: KvbmSettings, opts: BenchOptions, report: BenchReport,
                      bar: Progress, first_kind: str) -> None:
    """Batches of whole blocks through a fresh first tier alone.

    Memory bandwidth on a shared VM swings by 2x from one moment to the next, so
    each batch is timed right after plain copies of the same bytes with 1 and with
    N threads; the sum of the faster of each pair is a memory tier's limit. A first
    tier on disk or S3 gets its own limit (fio, raw boto3) in the limits phase.
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
        bar.phase("contiguous", 2 * (-(-n // batch)), text=f"{block_label(bb)} blocks, batches of {batch}")
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
            lim_off += best_copy(scratch[: len(hs)], src[: len(hs)], threads, pool)
            t0 = time.perf_counter()
            moved_off += mgr.offload(hs, cs).stored
            t_off += time.perf_counter() - t0
            bar.step(f"offload {i + len(hs)}/{n}")
        bar.text = "flushing"
        mgr.flush()
        match = mgr.match_prefix(hashes)
        with match:
            for i in range(0, match.num_blocks, batch):
                sub = _sub_match(match, i, batch)
                k = len(sub.hashes)
                lim_on += best_copy(scratch[:k], dst[:k], threads, pool)
                t0 = time.perf_counter()
                moved_on += mgr.onboard(sub, cd).loaded
                t_on += time.perf_counter() - t0
                ok = all(bytes(dst[j, :16]) == hashes[i + j] for j in range(k))
                if not ok:
                    report.mismatched_blocks += 1
                bar.step(f"onboard {i + k}/{n}")
        tier = mgr.chain[0].name
        label = f"[{block_label(bb)}-contiguous]"
        for op, moved, t, lim in (("offload", moved_off, t_off, lim_off), ("onboard", moved_on, t_on, lim_on)):
            p: dict[str, Any] = {
                "blocks": moved, "bytes": moved * bb, "seconds": t,
                "gbps": moved * bb / t / 1e9 if t else 0.0, "failures": 0}
            if first_kind == "memory":
                p["limit_gbps"] = moved * bb / lim / 1e9 if lim else 0.0
                p["limit"] = f"memcpy best of 1/{threads} threads or streamed, interleaved"
            report.paths[f"{op}:{tier}{label}"] = p
    finally:
        pool.shutdown()
        mgr.close()


def _plain_copy(dst: np.ndarray, src: np.ndarray, threads: int, pool: ThreadPoolExecutor) -> float:
    """Seconds to copy ``src`` into ``dst`` split across ``threads``, as the manager does."""
    return split_copy(dst, src, threads, pool)


def _sub_match(match: Any, start: int, n: int) -> Any:
    """A view of ``n`` blocks of a pinned match (the pins stay with the parent)."""
    return match.part(start, n)


def _first_dir(config: Any) -> str | None:
    path = getattr(config, "path", None)
    if isinstance(path, (list, tuple)):
        path = path[0] if path else None
    return str(path) if path else None


def _attach_limits(report: BenchReport, kinds: dict[str, str], pairs: DiskPairs | None = None) -> None:
    """Each path's own limit: fio (dd beside) for a tier on a local directory (paired
    around the workload's parts where ``pairs`` has pairs for the path: its ratio is
    their median), raw boto3 for S3, none for remote (said so), the best memory copy
    otherwise."""
    lim = report.limits
    threads = int(lim.get("memcpy_threads", 1))
    for name, p in report.paths.items():
        if "limit_gbps" in p:  # measured with the path itself (the contiguous phase)
            p["ratio"] = p["gbps"] / p["limit_gbps"] if p["limit_gbps"] else 0.0
            continue
        op, _, tier = name.partition(":")
        tier = tier.split("[", 1)[0]
        kind = kinds.get(tier, "memory")
        write = op == "offload"
        rw = "write" if write else "read"
        value, what = 0.0, "no limit"
        if kind == "disk":
            dd = lim.get(f"dd_{rw}:{tier}", 0.0)
            jobs = int(lim.get(f"fio_jobs:{tier}", 1))
            if pairs is not None and pairs.attach(name, p, rw, jobs):
                p["dd_gbps"] = dd
                p["limit"] += f" (dd {dd:.2f})"
                continue
            if lim.get(f"fio_{rw}:{tier}"):
                value, what = lim[f"fio_{rw}:{tier}"], f"fio {rw} O_DIRECT 2MiB x{jobs} jobs"
                if f"fio_samples:{tier}" in lim:
                    what += " (median of the samples: no part gave a pair)"
                p["dd_gbps"] = dd
                what += f" (dd {dd:.2f})"
            elif dd:
                value, what = dd, f"dd {rw} O_DIRECT 2MiB ({report.limit_notes.get(tier, 'no fio')})"
        elif kind == "s3":
            key = f"boto3_{'put' if write else 'get'}:{tier}"
            if lim.get(key):
                value = lim[key]
                what = f"raw boto3 {'put' if write else 'get'} x{int(lim[f'boto3_threads:{tier}'])} same server"
            else:
                what = f"no limit ({report.limit_notes.get(tier, 'not measured')})"
        elif kind == "remote":
            if not write and lim.get(f"nixl_read:{tier}"):
                value, what = lim[f"nixl_read:{tier}"], "raw NIXL READ, same peer"
                rc = lim.get(f"nixl_read_copy:{tier}", 0.0)
                if rc:
                    p["read_copy_gbps"] = rc
                    what += f" (then the engine copy: {rc:.2f}, ratio {p['gbps'] / rc:.2f})"
                rs = report.remote_samples
                if rs is not None and tier in rs.pairs and rs.pairs[tier].attach(name, p, "raw NIXL READ, same peer"):
                    p["end_limit_gbps"] = value  # the READ after the workload, as before
                    p["limit"] += f"; at the end {value:.2f}, ratio {p['gbps'] / value:.2f}"
                    if rc:
                        p["limit"] += f"; then the engine copy {rc:.2f}, ratio {p['gbps'] / rc:.2f}"
                    continue
            else:
                what = ("no limit (a remote tier reads only)" if write else
                        f"no limit ({report.limit_notes.get(tier, 'not measured')})")
        else:
            # A memory path: the best-of-1/N copies of 64 MiB sampled through the
            # workload, each window's figure paired with the samples around it
            # (``mempair``); without pairs, their median.
            value = lim.get("memcpy_gbps", 0.0)
            what = f"memcpy best of 1/{threads} threads or streamed"
            if report.mem_pairs.attach(name, p, what):
                continue
        p["limit_gbps"], p["limit"] = value, what
        p["ratio"] = p["gbps"] / value if value else None


def format_report(r: BenchReport) -> str:
    """The human summary table: every path's figure beside its own limit, as a ratio."""
    j = r.to_json()
    lines = [
        f"chain: {' -> '.join(r.chain)}; engine buffers: {r.engine}; block {block_label(r.block_bytes)}",
        f"turns {r.turns} in {r.seconds:.1f}s; prompt blocks {r.prompt_blocks}; "
        f"matched {r.matched_blocks} (hit rate {r.hit_rate:.1%}; by tier "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.matched_by_tier.items())) + ")",
        f"verified blocks {r.verified_blocks}, mismatched {r.mismatched_blocks}",
        f"match   p50 {j['match_ms']['p50']:.3f} ms  p99 {j['match_ms']['p99']:.3f} ms",
        f"onboard p50 {j['onboard_ms']['p50']:.2f} ms  p99 {j['onboard_ms']['p99']:.2f} ms",
        f"memory copy (same run): {r.limits.get('memcpy_gbps', 0):.2f} GB/s best of 1/"
        f"{int(r.limits.get('memcpy_threads', 1))} threads (median through the workload); "
        f"at the end {r.limits.get('memcpy_1t_gbps', 0):.2f} GB/s with 1 thread, "
        f"{r.limits.get('memcpy_nt_gbps', 0):.2f} with {int(r.limits.get('memcpy_threads', 1))}",
        "",
        f"{'path':<36}{'blocks':>7}{'GB':>8}{'GB/s':>8}{'limit':>8}{'ratio':>7}{'fail':>5}  limit is",
    ]
    for name, p in sorted(r.paths.items()):
        ratio = f"{p['ratio']:>7.2f}" if p.get("ratio") is not None else f"{'-':>7}"
        limit = f"{p['limit_gbps']:>8.2f}" if p.get("limit_gbps") else f"{'-':>8}"
        lines.append(
            f"{name:<36}{p['blocks']:>7}{p['bytes'] / 1e9:>8.2f}{p['gbps']:>8.2f}"
            f"{limit}{ratio}{p['failures']:>5}  {p['limit']}"
        )
    for tier, note in sorted(r.limit_notes.items()):
        lines.append(f"note: {tier}: {note}")
    return "\n".join(lines)


def environment_note() -> str:
    """One line on the machine, for the report header."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, load average {load}"

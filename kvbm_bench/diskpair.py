"""A disk tier's fio limit, paired around the workload's own disk figures (issue 14).

fio moves ±30–50 % by itself within seconds on a shared VM (``bench/disk.py``'s
``fio ÷ fio`` row), so one fio run at the end of the bench divides the workload's disk
figures by a figure of another moment. Instead the workload runs in ``SEGMENTS`` parts
and fio is sampled at every boundary, after the cascade has flushed (nothing else on
the disk, the workload's clock stopped): before the first turn, between the parts and
after the last. Each part's figure of a disk path (its bytes over its seconds in that
part) is divided by the better of the fio samples right before and right after it, as
``bench/disk.py`` pairs fio around each figure; a path's ratio is the median of its
parts' pair ratios (parts that moved fewer than ``MIN_BLOCKS`` blocks give none).

A sample is three fio runs with the tier's threads and the arguments of
``limits.fio_run`` at each of ``limits.fio_depths`` (``psync`` iodepth 1 and ``libaio``
at the tier's in-flight depth, each on its own files, half the bytes each, so a sample
takes about as long as one depth's did; each figure the better of the depths, as the
memory limit is the better of 1 and N threads): a write into new files (preallocated, never written, as a new
tier's slots; ext4 converts such an extent on its first write, and fio's own first
write ran at 0.84 of its overwrite here), the same files written again (an overwrite,
as a slot written before), and a read. A part's write limit weighs the two by the
tier's ``fresh_writes`` in that part: the seconds fio would take for the fresh bytes
at its fresh rate plus the rest at its overwrite rate.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

from .limits import fio_depth_name, fio_depths, fio_per_job, fio_run

SEGMENTS = 4  # parts of the workload, hence SEGMENTS + 1 fio samples per disk tier
MIN_BLOCKS = 8  # a part's figure of fewer blocks is a latency, not a rate: no pair


@dataclass
class FioSample:
    """GB/s of one fio sample: write into new files, the same written again, read; each
    the best of its depths, whose own figures ``depths`` keeps (depth -> the three)."""

    write_fresh: float
    write_over: float
    read: float
    depths: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    def write_limit(self, nbytes: int, fresh_bytes: int) -> float:
        """GB/s fio would write ``nbytes`` at, ``fresh_bytes`` of them into new space."""
        fresh = min(max(fresh_bytes, 0), nbytes)
        secs = fresh / self.write_fresh + (nbytes - fresh) / self.write_over
        return nbytes / secs if secs > 0 else 0.0


def fio_sample(fio: str, directory: str, jobs: int, nbytes: int) -> FioSample | None:
    """One ``FioSample`` in a new folder under ``directory`` (removed after): at each of
    ``fio_depths``, ``nbytes`` shared between them; None where fio fails there."""
    work = tempfile.mkdtemp(prefix="kvbm-fio-", dir=directory)
    name = f"kvbm-limit-{uuid.uuid4().hex[:8]}"
    depths = fio_depths(fio, directory)
    per = fio_per_job(nbytes // len(depths), jobs)
    by: dict[int, tuple[float, float, float]] = {}
    try:
        for d in depths:
            nd = f"{name}-qd{d}"  # each depth's own files: both first writes are fresh
            wf = fio_run(fio, work, "write", jobs, per, nd, d)
            wo = fio_run(fio, work, "write", jobs, per, nd, d)
            by[d] = (wf, wo, fio_run(fio, work, "read", jobs, per, nd, d))
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired):
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = [max(v[i] for v in by.values()) for i in range(3)]
    return FioSample(best[0], best[1], best[2], depths=by)


@dataclass
class Pair:
    """One part's (or window's) figure of a path and the limit around it."""

    gbps: float
    limit_gbps: float
    fresh_fraction: float = 0.0

    @property
    def ratio(self) -> float:
        return self.gbps / self.limit_gbps if self.limit_gbps > 0 else 0.0


def put_pairs(p: dict[str, Any], pairs: list[Pair]) -> list[float]:
    """Set a path's row ``p`` from its pairs: the limit and ratio (medians) and each
    pair's figures; returns the pairs' ratios (``diskpair``, ``mempair``)."""
    ratios = [x.ratio for x in pairs]
    p["limit_gbps"] = statistics.median(x.limit_gbps for x in pairs)
    p["ratio"] = statistics.median(ratios)
    p["pair_ratios"] = ratios
    p["pair_gbps"] = [x.gbps for x in pairs]
    p["pair_limits_gbps"] = [x.limit_gbps for x in pairs]
    return ratios


@dataclass
class _Tier:
    directory: str
    jobs: int
    samples: list[FioSample] = field(default_factory=list)
    last: FioSample | None = None
    snap: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    fresh: int = 0


class DiskPairs:
    """fio sampled at the workload's part boundaries for each disk tier; each part's
    ``offload:<tier>`` and ``onboard:<tier>`` figures paired with the samples around it."""

    def __init__(self, fio: str, tiers: dict[str, tuple[str, int]], nbytes: int,
                 block_bytes: int) -> None:
        self.fio = fio
        self.nbytes = nbytes
        self.block_bytes = block_bytes
        self.tiers = {name: _Tier(d, max(1, jobs)) for name, (d, jobs) in tiers.items()}
        self.pairs: dict[str, list[Pair]] = {}

    def boundary(self, paths: dict[str, dict[str, Any]],
                 tier_stats: dict[str, dict[str, Any]]) -> None:
        """At a part boundary (cascade flushed; ``paths`` and ``tier_stats`` as
        ``KvBlockManager.stats()`` gives them): close the part that ends here against the
        sample before it and a new one, which also opens the next part."""
        for name, t in self.tiers.items():
            snap = {p: (int(s["blocks"]), int(s["bytes"]), float(s["seconds"])) for p in
                    (f"offload:{name}", f"onboard:{name}") if (s := paths.get(p)) is not None}
            fresh = int(tier_stats.get(name, {}).get("fresh_writes", 0))
            now = fio_sample(self.fio, t.directory, t.jobs, self.nbytes)
            if now is not None:
                t.samples.append(now)
            if t.last is not None and now is not None:
                self._close(name, t, snap, fresh - t.fresh, t.last, now)
            t.last, t.snap, t.fresh = now, snap, fresh

    def _close(self, name: str, t: _Tier, snap: dict[str, tuple[int, int, float]],
               fresh_blocks: int, before: FioSample, after: FioSample) -> None:
        for path, (blocks, nbytes, secs) in snap.items():
            b0, n0, s0 = t.snap.get(path, (0, 0, 0.0))
            blocks, nbytes, secs = blocks - b0, nbytes - n0, secs - s0
            if blocks < MIN_BLOCKS or secs <= 0:
                continue
            if path.startswith("offload:"):
                fb = min(nbytes, max(0, fresh_blocks) * self.block_bytes)
                lim = max(before.write_limit(nbytes, fb), after.write_limit(nbytes, fb))
                frac = fb / nbytes
            else:
                lim, frac = max(before.read, after.read), 0.0
            self.pairs.setdefault(path, []).append(Pair(nbytes / secs / 1e9, lim, frac))

    def limits(self) -> dict[str, float]:
        """Each tier's fio figures, medians of its samples, for the report's ``limits``:
        the best of the depths, and each depth's own (``fio_write_qd<d>:<tier>`` …)."""
        out: dict[str, float] = {}
        for name, t in self.tiers.items():
            if not t.samples:
                continue
            out[f"fio_write:{name}"] = statistics.median(s.write_over for s in t.samples)
            out[f"fio_write_fresh:{name}"] = statistics.median(s.write_fresh for s in t.samples)
            out[f"fio_read:{name}"] = statistics.median(s.read for s in t.samples)
            for d in sorted({d for s in t.samples for d in s.depths}):
                got = [s.depths[d] for s in t.samples if d in s.depths]
                out[f"fio_write_qd{d}:{name}"] = statistics.median(x[1] for x in got)
                out[f"fio_write_fresh_qd{d}:{name}"] = statistics.median(x[0] for x in got)
                out[f"fio_read_qd{d}:{name}"] = statistics.median(x[2] for x in got)
            out[f"fio_jobs:{name}"] = float(t.jobs)
            out[f"fio_samples:{name}"] = float(len(t.samples))
        return out

    def depth_name(self, tier: str) -> str:
        """How ``tier``'s samples were taken (``limits.fio_depth_name``)."""
        t = self.tiers.get(tier)
        depths = sorted({d for s in t.samples for d in s.depths}) if t is not None else []
        return fio_depth_name(depths) if depths else "psync iodepth 1"

    def attach(self, path: str, p: dict[str, Any], rw: str, jobs: int) -> bool:
        """Set ``path``'s limit, ratio (median of its pairs) and pairs in ``p``; False
        where it has no pair."""
        pairs = self.pairs.get(path)
        if not pairs:
            return False
        ratios = put_pairs(p, pairs)
        what = (f"fio {rw} O_DIRECT 2MiB x{jobs} jobs paired around {len(pairs)} parts "
                f"(median; pairs {min(ratios):.2f}-{max(ratios):.2f}), "
                f"{self.depth_name(path.split(':', 1)[-1])}")
        if rw == "write":
            frac = sum(x.fresh_fraction for x in pairs) / len(pairs)
            p["fresh_fraction"] = frac
            what += f", {frac:.0%} into new space"
        p["limit"] = what
        return True

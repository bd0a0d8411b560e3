"""Physical limits measured in the same run, as denominators of each figure's ratio.

Every path has its own limit, measured on the same bytes, in the same run:

- memory paths: the best of a 1-thread and an N-thread copy (``memcpy_best``), each
  by ``memcpy`` and by streaming stores (``best_copy``): one thread is faster than
  several on some machines, and streaming faster than glibc's memcpy for copies that
  pass the caches, so a fixed count or memcpy alone would flatter;
- a tier on a local directory: fio with O_DIRECT, 2 MiB blocks and ``numjobs`` = the
  tier's I/O threads, the better of ``psync`` (iodepth 1) and ``libaio`` at the tier's
  in-flight depth (``fio_gbps``, ``FIO_DEPTHS``), with ``dd`` (one request in flight) beside it;
  without fio, dd is the limit and the table says so;
- an S3 tier: a raw boto3 put/get loop against the same server, bucket and
  credentials, with the tier's concurrency (``s3_raw_gbps``);
- a remote tier's reads: a raw NIXL READ of blocks it read, from the same peer,
  through its own agent (``remote_raw_read_gbps``); where none can be measured (no
  NIXL, no block read from a peer) the table says "no limit" rather than a wrong one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 2 * 2**20  # fio's and dd's block size: one 2 MiB KV block per request


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` timings of ``fn()``, in seconds: the least disturbed run."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def split_copy(dst: np.ndarray, src: np.ndarray, threads: int, pool: ThreadPoolExecutor | None) -> float:
    """Seconds to copy ``src`` into ``dst`` (same shape) split along the first axis
    across ``threads`` (this thread takes the first slice; ``np.copyto`` releases the GIL)."""
    k = len(src)
    if threads <= 1 or pool is None or k < 2:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0
    step = -(-k // threads)
    t0 = time.perf_counter()
    futs = [pool.submit(np.copyto, dst[j : j + step], src[j : j + step]) for j in range(step, k, step)]
    np.copyto(dst[:step], src[:step])
    for f in futs:
        f.result()
    return time.perf_counter() - t0


def stream_copy(dst: np.ndarray, src: np.ndarray, threads: int,
                pool: ThreadPoolExecutor | None) -> float:
    """Seconds to copy ``src`` into ``dst`` (C-contiguous, same shape) with streaming
    stores (kvbm's native loop, which writes past the caches without reading each
    destination line first), split along the first axis as ``split_copy``. Without the
    native loop, ``split_copy`` (memcpy)."""
    from kvbm.engine_blocks import _native

    fn = _native.stream_runs()
    k = len(src)
    if fn is None or not (dst.flags.c_contiguous and src.flags.c_contiguous) or k == 0:
        return split_copy(dst, src, threads, pool)
    parts = 1 if threads <= 1 or pool is None or k < 2 else threads
    step = -(-k // parts)
    row = src.nbytes // k
    starts = list(range(0, k, step))
    d0, s0 = _native.address(dst), _native.address(src)
    ptrs = [(np.array([d0 + j * row], dtype=np.int64), np.array([s0 + j * row], dtype=np.int64),
             (min(k, j + step) - j) * row) for j in starts]

    def one(p: tuple[np.ndarray, np.ndarray, int]) -> None:
        fn(1, _native.address(p[0]), _native.address(p[1]), p[2])

    t0 = time.perf_counter()
    futs = [pool.submit(one, p) for p in ptrs[1:]] if pool is not None else []
    one(ptrs[0])
    for f in futs:
        f.result()
    return time.perf_counter() - t0


def llc_bytes() -> int:
    """Bytes of this CPU's largest cache (sysfs), 32 MiB where it cannot be read."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            txt = p.read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


class ColdPairs:
    """Buffers for limit copies that start from memory, not from the cache, as a
    path's own copy of KV the engine wrote long before does.

    Copying the same two buffers back to back times the last-level cache once they
    fit in it (this VM reports 480 MiB of L3: a 2-thread streamed copy of 128 MiB ran
    at 21.5 GB/s warm against 15.1 GB/s after 1 GiB written elsewhere, medians of 8,
    load 0.8). So each limit copy takes the next two slices of a touched ring of at
    least twice the cache; a slice comes round again only after more bytes than the
    cache holds have passed through it. ``flush`` reads as much as the cache twice over
    (a buffer of its own) to start a path's timed copy from the same cold cache."""

    def __init__(self, nbytes: int, cache_bytes: int | None = None) -> None:
        self.nbytes = max(1, int(nbytes))
        cache = llc_bytes() if cache_bytes is None else cache_bytes
        k = max(4, -(-2 * cache // self.nbytes))
        k += k % 2
        self.ring = np.ones(k * self.nbytes, dtype=np.uint8)  # touched: no faults timed
        # Flushed through its own buffer: written over, the ring's slices would be
        # the freshest lines in the cache for the limit copy that follows.
        self._wipe = np.ones(2 * cache, dtype=np.uint8)
        self._k = k
        self._i = 0
        self._sink = 0

    def take(self, like: np.ndarray) -> np.ndarray:
        """The next cold slice, shaped as ``like`` (uint8 bytes of it)."""
        nb = like.nbytes
        if nb > self.nbytes:
            raise ValueError(f"ColdPairs: a copy of {nb} bytes is larger than the ring's "
                             f"slices ({self.nbytes}); make the ring with nbytes={nb}")
        out = self.ring[self._i * self.nbytes : self._i * self.nbytes + nb]
        self._i = (self._i + 1) % self._k
        shape = like.view(np.uint8).shape if like.dtype != np.uint8 else like.shape
        return out.reshape(shape)

    def flush(self) -> None:
        """Read twice the cache's bytes elsewhere: what was cached is gone, and the lines
        that replace it are clean (written lines would cost the timed copy their write-back)."""
        self._sink = int(self._wipe.view(np.uint64).max())


def copy_limits(dst: np.ndarray, src: np.ndarray, threads: int,
                pool: ThreadPoolExecutor | None, cold: ColdPairs | None = None) -> dict[str, float]:
    """Seconds of each way to copy the same bytes: ``memcpy`` (numpy's copy) and
    streaming stores, each with 1 and with ``threads`` threads. Back to back on
    ``dst``/``src``, or with ``cold`` each on the next cold pair of the same size
    (``ColdPairs``): the bytes come from memory, not from the cache."""
    def bufs() -> tuple[np.ndarray, np.ndarray]:
        if cold is None:
            return dst, src
        return cold.take(dst), cold.take(src)

    out = {"memcpy 1": split_copy(*bufs(), 1, None), "stream 1": stream_copy(*bufs(), 1, None)}
    if threads > 1:
        out[f"memcpy {threads}"] = split_copy(*bufs(), threads, pool)
        out[f"stream {threads}"] = stream_copy(*bufs(), threads, pool)
    return out


def best_copy(dst: np.ndarray, src: np.ndarray, threads: int, pool: ThreadPoolExecutor | None,
              cold: ColdPairs | None = None) -> float:
    """The fastest copy of the same bytes this machine has, 1 or ``threads`` threads,
    ``memcpy`` or streaming stores (seconds): the memory limit of a path that copies
    these bytes; from cold buffers with ``cold`` (``copy_limits``). (glibc's memcpy
    streams only for single copies of most of the last-level cache; kvbm's copy loop
    streams its batches, so a limit of memcpy alone would sit below what kvbm itself
    reaches.)"""
    return min(copy_limits(dst, src, threads, pool, cold).values())


@dataclass
class MemcpyLimit:
    """GB/s of one copy of the same bytes with 1 and with ``threads`` threads."""

    one_thread_gbps: float
    n_threads_gbps: float
    threads: int

    @property
    def best_gbps(self) -> float:
        return max(self.one_thread_gbps, self.n_threads_gbps)

    @property
    def name(self) -> str:
        t = 1 if self.one_thread_gbps >= self.n_threads_gbps else self.threads
        return f"memcpy best of 1/{self.threads} threads ({t} won)"


def memcpy_best(nbytes: int = 256 * 2**20, threads: int = 2, repeats: int = 5) -> MemcpyLimit:
    """Best-of-``repeats`` GB/s of copying ``nbytes`` between two touched buffers with
    one thread and with ``threads``, interleaved (1, N, 1, N …) so load drift hits both;
    each the faster of ``memcpy`` and streaming stores (``best_copy``)."""
    src = np.ones((max(threads, 1) * 8, nbytes // (max(threads, 1) * 8)), dtype=np.uint8)
    dst = np.zeros_like(src)
    one = many = float("inf")
    with ThreadPoolExecutor(max(1, threads - 1)) as pool:
        for _ in range(repeats):
            one = min(one, split_copy(dst, src, 1, None), stream_copy(dst, src, 1, None))
            if threads > 1:
                many = min(many, split_copy(dst, src, threads, pool),
                           stream_copy(dst, src, threads, pool))
    if threads <= 1:
        many = one
    return MemcpyLimit(src.nbytes / one / 1e9, src.nbytes / many / 1e9, max(threads, 1))


def memcpy_gbps(nbytes: int = 256 * 2**20, threads: int = 1, repeats: int = 5) -> float:
    """Best-of-``repeats`` GB/s of copying ``nbytes`` with exactly ``threads`` threads."""
    lim = memcpy_best(nbytes, threads, repeats)
    return lim.n_threads_gbps if threads > 1 else lim.one_thread_gbps


# -- disk --------------------------------------------------------------------------


def find_fio() -> str | None:
    """fio: ``KVBM_FIO``, the one ``make fio`` unpacked (``.tools/bin/fio`` of the source
    tree or of the current directory), else the one on PATH; None when there is none."""
    cands = [os.environ.get("KVBM_FIO", "")]
    cands += [str(Path(__file__).resolve().parent.parent / ".tools" / "bin" / "fio"),
              str(Path.cwd() / ".tools" / "bin" / "fio")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which("fio")


# fio's depths for a disk limit: ``psync`` (iodepth 1, one request in flight per job) and
# ``libaio`` at the disk tier's in-flight depth (its native loop keeps block i's data, block
# i-1's header and block i+1's invalidation in flight per thread). The limit is the
# better of the two, as the memory limit is the better of 1 and N threads.
FIO_DEPTHS = (1, 3)


def fio_run(fio: str, work: str, rw: str, jobs: int, per_job: int, name: str = "kvbm-limit",
            depth: int = 1) -> float:
    """GB/s of one fio run in ``work``: ``rw`` (write or read) of ``jobs`` files of
    ``per_job`` bytes named ``name``, O_DIRECT, 2 MiB blocks; ``depth`` 1 is ``psync``
    (one request in flight per job), more is ``libaio`` with that ``iodepth``. A write
    into files fio has not seen creates them first (preallocated, as the tier's slot
    files); again, it overwrites them. Raises RuntimeError (or OSError, ValueError)
    where fio fails."""
    engine = ["--ioengine=psync"] if depth <= 1 else ["--ioengine=libaio", f"--iodepth={depth}"]
    r = subprocess.run(
        [fio, f"--name={name}", f"--directory={work}", f"--rw={rw}", f"--bs={BLOCK}",
         f"--size={per_job}", f"--numjobs={max(1, jobs)}", "--direct=1", *engine,
         "--group_reporting", "--output-format=json", "--thread"],
        capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip() or r.stdout.strip())
    out = r.stdout[r.stdout.index("{"):]  # fio may print notes before its JSON
    bw = float(json.loads(out)["jobs"][0]["write" if rw == "write" else "read"]["bw_bytes"])
    if bw <= 0:
        raise RuntimeError("fio reported no bandwidth")
    return bw / 1e9


_AIO_OK: dict[tuple[str, str], bool] = {}


def fio_depths(fio: str, directory: str) -> tuple[int, ...]:
    """``FIO_DEPTHS`` where this fio runs ``libaio`` with O_DIRECT in ``directory`` (one
    2 MiB write, checked once per process), else ``(1,)``: ``psync`` alone."""
    key = (fio, directory)
    if key not in _AIO_OK:
        work = tempfile.mkdtemp(prefix="kvbm-fio-", dir=directory)
        try:
            fio_run(fio, work, "write", 1, BLOCK, "kvbm-aio-probe", depth=FIO_DEPTHS[-1])
            _AIO_OK[key] = True
        except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired):
            _AIO_OK[key] = False
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return FIO_DEPTHS if _AIO_OK[key] else (1,)


def fio_depth_name(depths: tuple[int, ...] | list[int]) -> str:
    """How a limit over ``depths`` was taken, for the tables."""
    names = [("psync iodepth 1" if d <= 1 else f"libaio iodepth {d}") for d in depths]
    if len(names) == 1 and depths[0] <= 1:
        return "psync iodepth 1 alone (fio has no libaio here)"
    return "best of " + " and ".join(names)


def fio_per_job(nbytes: int, jobs: int) -> int:
    """Bytes per fio job for ``nbytes`` in all: whole 2 MiB blocks, at least one."""
    return max(BLOCK, nbytes // max(1, jobs) // BLOCK * BLOCK)


def fio_gbps(directory: str, threads: int, nbytes: int = 512 * 2**20, repeats: int = 2,
             fio: str | None = None) -> tuple[float, float] | None:
    """(write, read) GB/s of fio in ``directory``: O_DIRECT, 2 MiB blocks, ``threads``
    jobs, at each of ``fio_depths`` (``nbytes`` shared between them, so the run takes
    about as long as one depth would); the best of the depths and of ``repeats``. None
    where fio is missing or fails (O_DIRECT refused …)."""
    fio = fio or find_fio()
    if fio is None:
        return None
    jobs = max(1, threads)
    depths = fio_depths(fio, directory)
    per_job = fio_per_job(nbytes // len(depths), jobs)
    work = tempfile.mkdtemp(prefix="kvbm-fio-", dir=directory)
    name = f"kvbm-limit-{uuid.uuid4().hex[:8]}"
    try:
        w = max(fio_run(fio, work, "write", jobs, per_job, name, d)
                for d in depths for _ in range(repeats))
        rd = max(fio_run(fio, work, "read", jobs, per_job, name, d)
                 for d in depths for _ in range(repeats))
    except (OSError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired):
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return w, rd


def dd_direct_gbps(directory: str, nbytes: int = 512 * 2**20, repeats: int = 3) -> tuple[float, float]:
    """(write, read) GB/s of ``dd`` with O_DIRECT and 2 MiB blocks in ``directory``.

    One request in flight, no page cache: shown beside fio. Returns (0, 0) where dd
    or O_DIRECT is unavailable.
    """
    if shutil.which("dd") is None:
        return 0.0, 0.0
    count = max(1, nbytes // BLOCK)

    def run(args: list[str]) -> float:
        r = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
        m = re.search(r"copied, ([0-9.e+-]+) s", r.stderr)
        if m is None:
            raise RuntimeError(r.stderr)
        return float(m.group(1))

    fd, path = tempfile.mkstemp(prefix="kvbm-dd-", dir=directory)
    os.close(fd)
    try:
        w = min(run(["if=/dev/zero", f"of={path}", "bs=2M", f"count={count}", "oflag=direct",
                     "conv=notrunc"]) for _ in range(repeats))
        r = min(run([f"if={path}", "of=/dev/null", "bs=2M", f"count={count}", "iflag=direct"])
                for _ in range(repeats))
    except (subprocess.CalledProcessError, RuntimeError):
        return 0.0, 0.0
    finally:
        os.unlink(path)
    size = count * BLOCK
    return size / w / 1e9, size / r / 1e9


# -- object store -----------------------------------------------------------------


def s3_raw_gbps(cfg: Any, threads: int, block_bytes: int, blocks: int = 16,
                repeats: int = 2) -> tuple[float, float]:
    """(put, get) GB/s of a raw boto3 loop: ``blocks`` objects of ``block_bytes`` put
    then got by ``threads`` threads, through a client built from the tier's own config
    (endpoint, bucket, region, credentials); best of ``repeats``. The objects go under
    ``{prefix}/kvbm-bench-limit/`` and are deleted after. Raises on a server error."""
    from kvbm.objectstore import s3_client

    client = s3_client(cfg, max_pool_connections=threads + 2,
                       request_checksum_calculation="when_required",
                       response_checksum_validation="when_required")
    payload = np.random.default_rng(7).integers(0, 256, block_bytes, dtype=np.uint8).tobytes()
    base = f"{cfg.prefix.rstrip('/')}/kvbm-bench-limit/{uuid.uuid4().hex}".lstrip("/")
    keys = [f"{base}/{i}" for i in range(blocks)]
    bucket = cfg.bucket

    def put(k: str) -> None:
        client.put_object(Bucket=bucket, Key=k, Body=payload)

    def get(k: str) -> None:
        n = len(client.get_object(Bucket=bucket, Key=k)["Body"].read())
        if n != block_bytes:
            raise RuntimeError(f"raw get of {k}: {n} bytes, not {block_bytes}")

    nbytes = blocks * block_bytes
    tp = tg = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        try:
            list(pool.map(put, keys))  # warm-up: connections opened, server paths hot
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(put, keys))
                tp = min(tp, time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(pool.map(get, keys))
                tg = min(tg, time.perf_counter() - t0)
        finally:
            for i in range(0, len(keys), 1000):
                client.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
    return nbytes / tp / 1e9, nbytes / tg / 1e9


def nixl_importable() -> bool:
    """Whether NIXL can be imported here (the remote tier's transport)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nixl") is not None
    except (ImportError, ValueError):
        return False


# -- remote (NIXL) ----------------------------------------------------------------


def remote_raw_read_gbps(tier: Any, keys: list[bytes], bufs: list[np.ndarray], repeats: int = 3) -> float:
    """GB/s of one raw NIXL READ of ``keys``' blocks from a live peer of a remote tier
    into ``bufs``: the limit of that tier's reads. Through the tier's own agent and
    UCX transports, with its local buffers registered as its reads register them; the
    blocks are leased (pinned) on the peer for the READs, then released. No checksum,
    no lease per step, no pipelining: the transfer alone, best of ``repeats``.
    Raises RuntimeError when no live peer serves every key."""
    ps, reader, agent, lock = tier._peer_set, tier._reader, tier._agent, tier._nixl_lock
    bb = int(tier.block_bytes)
    peers = [p for p in ps.live() if p.up]
    if not peers:
        raise RuntimeError("no live peer")
    local = []
    for b in bufs[: len(keys)]:
        addr = reader._local_addr(b)
        if addr is None:
            raise RuntimeError("a local buffer could not be registered with NIXL")
        local.append((int(addr), bb, 0))
    for peer in peers:
        with peer.lock:
            reply = ps.rpc(peer, {"op": "lease", "keys": list(keys), "ttl": 30})
        try:
            blocks = reply["blocks"]
            if any(b is None for b in blocks):
                continue  # this peer does not hold them all: try the next one
            remote = [(int(b[0]), bb, 0) for b in blocks]
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                with lock:
                    h = agent.initialize_xfer("READ", agent.get_xfer_descs(local, "DRAM"),
                                              agent.get_xfer_descs(remote, "DRAM"), peer.agent)
                    state = agent.transfer(h)
                asked = False
                while state == "PROC":
                    if not asked and time.perf_counter() - t0 > 0.002:
                        asked = True  # as the tier does: the transport may need the peer's progress
                        with peer.lock:
                            ps.send(peer, {"op": "pump"})
                    with lock:
                        state = agent.check_xfer_state(h)
                dt = time.perf_counter() - t0
                with lock:
                    agent.release_xfer_handle(h)
                if state != "DONE":
                    raise RuntimeError(f"raw NIXL READ ended in state {state}")
                best = min(best, dt)
            return len(keys) * bb / best / 1e9
        finally:
            with peer.lock:
                ps.rpc(peer, {"op": "release", "lease": reply["lease"]}, reply=False)
    raise RuntimeError("no live peer holds every block read")

"""One native loop that copies a batch of memory runs: ``memcpy`` over pointer arrays.

A batch of engine-shaped blocks is thousands of separate runs (one per block, layer
and K/V half, 32 KiB each for a Llama-8B-like model): one ``np.copyto`` per run costs
about a fifth of the copy in call overhead, and the threads that split a batch then
queue for the GIL between calls. Here the runs' addresses are written by one C call
(``block_table``; rows of one array from their numbers, ``copy_rows_at``) and one C
call (``ctypes`` releases the GIL for it) copies them all, so threads that split a
batch copy in parallel without meeting again.

A call that moves ``STREAM_MIN_BYTES`` or more in all writes with streaming
(non-temporal) stores on x86-64: past the caches, plain stores first read every
destination line (a third more memory traffic), and glibc's ``memcpy`` streams only
for single copies of most of the last-level cache, never for 32 KiB runs.

The loop is a few dozen lines of C compiled once per process with the system's C compiler
(``$CC``, else ``cc`` or ``gcc``) into a private temporary directory (mode 0700,
removed once loaded). Without a compiler ``copy_runs`` is None and callers use
their numpy paths, byte for byte the same, only slower. Nothing is cached on disk,
so no file another user could replace is ever loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvbm import _cc
from kvbm.errors import LayoutError

from ._native_c import SOURCE as _SOURCE

log = logging.getLogger("kvbm")

#: ``fn(n, dst_ptrs, src_ptrs, run_bytes)``: copies run ``i`` of ``run_bytes`` bytes from
#: address ``src_ptrs[i]`` to ``dst_ptrs[i]`` (pointers to int64 arrays of n addresses).
RunCopy = Callable[[int, int, int, int], None]
#: ``fn(n, blocks, bufs, nl, layers, base, stride, R, eoff, hoff, bytes_per_layer,
#: layer_major, eng_out, host_out)``, every array an address: ``kvbm_block_table``.
BlockTable = Callable[[int, int, int, int, int, int, int, int, int, int, int, int, int, int],
                      None]
#: ``fn(n, dst_ptrs, src_ptrs, rows, row_bytes, dst_stride, src_stride)``: for each of
#: the n pairs, ``rows`` rows of ``row_bytes`` bytes, ``*_stride`` bytes apart.
RowCopy = Callable[[int, int, int, int, int, int, int], None]

_fn: RunCopy | None = None
_stream: RunCopy | None = None
_rows: RowCopy | None = None
_stream_min: ctypes.c_int64 | None = None
_can_stream = False
_table: BlockTable | None = None
#: ``fn(n, dst_ptrs, src_ptrs, run_bytes, chunk, ctl, stream, wait)``: the runs in
#: chunks claimed from a counter shared by every thread that calls it (``share``).
_shared: Callable[[int, int, int, int, int, int, int, int], None] | None = None
_check: Callable[[int, int, int, int, int, int | None], int] | None = None  # kvbm_check_ids
#: ``kvbm_rows_table``: ``kvbm_check_ids``, the rows' addresses, the engine order and
#: ``kvbm_block_table`` in one call (``rows_table``).
RowsTable = Callable[..., int]
_rows_tab: RowsTable | None = None
#: Bytes a thread claims at a time from a batch shared between copy threads: small
#: enough that a thread the scheduler delays holds back little at the end, large
#: enough that claiming (one atomic add) costs nothing.
SHARE_CHUNK_BYTES = 2 * 2**20
_par = threading.local()
#: False turns the native loop off in this process (tests compare both paths).
enabled = True
#: A call of ``copy_runs`` that moves at least this many bytes in all uses streaming
#: stores (x86-64): past the caches, a copy that skips the read-for-ownership of each
#: destination line moves a third less memory traffic. Smaller calls (one block, a
#: few layers) use ``memcpy``, whose destination stays in the cache for the reader.
STREAM_MIN_BYTES = 4 * 2**20


def _build() -> tuple[RunCopy, RunCopy, RowCopy, ctypes.c_int64, bool] | None:
    so = _cc.build(_SOURCE, "the engine-block copy loop", "numpy")
    if so is None:
        return None
    fn = so.kvbm_copy_runs
    fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    stream = so.kvbm_stream_runs
    stream.argtypes = fn.argtypes
    stream.restype = None
    rows = so.kvbm_copy_rows
    rows.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    rows.restype = None
    global _shared, _table, _check, _rows_tab
    table = so.kvbm_block_table
    table.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_void_p, ctypes.c_void_p]
    table.restype = None
    _table = table
    shared = so.kvbm_copy_runs_shared
    shared.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    shared.restype = None
    _shared = shared
    _rows_tab = rt = so.kvbm_rows_table
    rt.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, *table.argtypes[4:]]
    rt.restype = ctypes.c_int64
    _check = check = so.kvbm_check_ids
    check.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                      ctypes.c_int64, ctypes.c_void_p]
    check.restype = ctypes.c_int64
    smin = ctypes.c_int64.in_dll(so, "kvbm_stream_min")
    can = bool(so.kvbm_can_stream())
    smin.value = STREAM_MIN_BYTES if can else -1
    return fn, stream, rows, smin, can


def _set() -> bool | None:
    """``_build`` and its results set in the globals above; None without the loop."""
    global _fn, _stream, _rows, _stream_min, _can_stream
    built = _build()
    if built is None:
        return None
    _fn, _stream, _rows, _stream_min, _can_stream = built
    return True


#: ``_load()``: the loop built and the globals set, at the first call (once a process).
_load = _cc.Once(_set)


def set_stream_min(nbytes: int | None) -> None:
    """Calls of ``copy_runs`` moving at least ``nbytes`` stream; None: never (plain
    ``memcpy`` only; tests and the bench compare both). No effect without the loop."""
    _load()
    if _stream_min is not None:
        _stream_min.value = -1 if nbytes is None or not _can_stream else max(0, int(nbytes))


def stream_min() -> int | None:
    """The current streaming threshold in bytes; None when copies never stream."""
    _load()
    if _stream_min is None or _stream_min.value < 0:
        return None
    return int(_stream_min.value)


def copy_runs() -> RunCopy | None:
    """The native run copier, built on first use; None without a C compiler (or disabled)."""
    if not enabled:
        return None
    _load()
    return _fn


def stream_runs() -> RunCopy | None:
    """``copy_runs`` that always streams (where the CPU can; else ``memcpy``), whatever
    the threshold: the memory limit of a bench measures the best copy the machine has."""
    _load()
    return _stream


def copy_rows() -> RowCopy | None:
    """The native strided copier (rows of equal length), or None as ``copy_runs``."""
    if not enabled:
        return None
    _load()
    return _rows


def block_table() -> BlockTable | None:
    """The native builder of a batch's address tables (``kvbm_block_table``), or None as
    ``copy_runs``."""
    if not enabled:
        return None
    _load()
    return _table


def rows_table() -> RowsTable | None:
    """The native check and address tables of a row copy (``kvbm_rows_table``), or None
    as ``copy_runs``."""
    if not enabled:
        return None
    _load()
    return _rows_tab


def row_numbers(rows: Any, at: Sequence[int], n: int, row_bytes: int, *,
                writable: bool = False, what: str = "") -> np.ndarray:
    """``at`` as int64 row numbers of ``rows``, checked for a copy by row number: ``rows``
    a C-contiguous uint8 array ``[slots, row_bytes]`` (a tier's arena; writable when
    ``writable``), ``n`` numbers, each a row of it. A ``LayoutError`` naming the value
    otherwise (``what``: what the rows hold, for its message)."""
    if (not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2
            or rows.shape[1] != row_bytes or not rows.flags.c_contiguous):
        raise LayoutError(
            f"rows: expected a C-contiguous uint8 array [slots, {row_bytes}]{what}, got "
            f"{getattr(rows, 'dtype', type(rows).__name__)} {list(getattr(rows, 'shape', []))}")
    if writable and not rows.flags.writeable:
        raise LayoutError("rows: expected a writable array, got a read-only one")
    r = np.asarray(at, dtype=np.int64)
    if r.shape != (n,):
        raise LayoutError(f"rows: expected {n} row numbers (one per block), got {len(r)}")
    # One reduction: seen as unsigned, a negative number is past any end.
    if n and int(r.view(np.uint64).max()) >= rows.shape[0]:
        bad = next(int(x) for x in r if not 0 <= x < rows.shape[0])
        raise LayoutError(f"row {bad} is out of range [0, {rows.shape[0]}) of rows")
    return r


def checked_rows(blocks: np.ndarray, num_blocks: int, rows: Any, at: Sequence[int],
                 row_bytes: int, writable: bool, unique: bool) -> np.ndarray | None:
    """``at`` as int64 rows of ``rows`` (checked as ``row_numbers``) and ``blocks`` in
    ``[0, num_blocks)`` (none twice with ``unique``) by one C call, not a numpy call per
    check (each cache misses after a copy's sweep); None if any is off: the caller's
    checks then name it."""
    _load()
    if (_check is None or not enabled or blocks.dtype != np.int64 or blocks.ndim != 1
            or not blocks.flags.c_contiguous or not isinstance(rows, np.ndarray)
            or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != row_bytes
            or not rows.flags.c_contiguous or (writable and not rows.flags.writeable)):
        return None
    r = np.asarray(at, dtype=np.int64)
    n = len(blocks)
    if r.shape != (n,) or not r.flags.c_contiguous:
        return None
    seen = np.zeros(num_blocks, dtype=np.uint8) if unique and n > 1 else None
    if _check(n, address(blocks), num_blocks, address(r), rows.shape[0],
              None if seen is None else address(seen)):
        return None
    return r


def copy_rows_at(dst: np.ndarray, dst_at: np.ndarray, src: np.ndarray,
                 src_at: np.ndarray) -> bool:
    """Row ``src_at[i]`` of ``src`` into row ``dst_at[i]`` of ``dst``: two C-contiguous
    ``uint8`` arrays ``[rows, row_bytes]`` of one row size (a tier's arena, a caller's
    blocks), int64 row numbers the caller checked. One native call, the address of each
    row computed from the array's base and row number (no Python per block), shared
    with the copy threads of an enclosing ``share``. False (nothing copied) without the
    native loop."""
    fn = copy_runs()
    n = len(dst_at)
    if fn is None:
        return False
    if n:
        run = int(dst.shape[1])
        dp = dst_at * dst.strides[0]
        dp += address(dst)
        sp = src_at * src.strides[0]
        sp += address(src)
        run_copy(fn, n, dp, sp, run)
    return True


def address(buf: np.ndarray) -> int:
    """The address of a numpy array's first byte."""
    return int(buf.__array_interface__["data"][0])


def run_table(view: np.ndarray) -> tuple[int, np.ndarray]:
    """``(run_bytes, offsets)``: ``view`` (a uint8 view) as equal contiguous runs.

    ``offsets[i]`` is run ``i``'s byte offset from ``view``'s first byte, runs in C
    order of the view's elements, so run ``i`` lands at ``i * run_bytes`` of a
    C-contiguous copy of the view.
    """
    assert view.itemsize == 1, "run_table reads byte views"
    dims = [(int(s), int(st)) for s, st in zip(view.shape, view.strides) if s != 1]
    run = 1
    j = len(dims)
    while j > 0 and dims[j - 1][1] == run:
        run *= dims[j - 1][0]
        j -= 1
    offs = np.zeros(1, dtype=np.int64)
    for s, st in dims[:j]:
        offs = (offs[:, None] + np.arange(s, dtype=np.int64)[None, :] * st).reshape(-1)
    return run, offs


@contextlib.contextmanager
def share(pool: ThreadPoolExecutor | None, threads: int) -> Iterator[None]:
    """Within: native batch copies this thread makes (``run_copy``: the adapter's,
    ``copy_pairs``) are shared with up to ``threads - 1`` helpers from ``pool``.

    Not a fixed split: the runs are claimed in ``SHARE_CHUNK_BYTES`` chunks from one
    counter by this thread and by each helper as it starts, so a helper that waits for
    a core (another process holds it) takes less, or nothing, and this thread does
    the rest; it waits only for chunks a helper has claimed, never for a helper to
    start. One address table, one C call per thread: no Python per chunk.
    """
    prev = getattr(_par, "v", None)
    _par.v = (pool, threads) if pool is not None and threads > 1 else None
    try:
        yield
    finally:
        _par.v = prev


def run_copy(fn: RunCopy, n: int, dst: np.ndarray, src: np.ndarray, run: int) -> None:
    """``fn(n, dst, src, run)`` on int64 address arrays (``copy_runs()``), shared with the
    helpers of an enclosing ``share`` when the batch is at least two chunks."""
    par = getattr(_par, "v", None)
    shared = _shared
    total = n * run
    if par is None or shared is None or fn is not _fn or total < 2 * SHARE_CHUNK_BYTES:
        fn(n, address(dst), address(src), run)
        return
    pool, k = par
    chunk = max(1, SHARE_CHUNK_BYTES // run)
    helpers = min(k - 1, -(-n // chunk) - 1)
    smin = _stream_min.value if _stream_min is not None else -1
    stream = int(0 <= smin <= total)
    ctl = np.zeros(2, dtype=np.int64)
    args = (n, address(dst), address(src), run, chunk, address(ctl), stream)

    def helper(keep: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        # ``keep`` holds the counter and address tables alive: a helper that starts
        # after the batch is done reads the counter, claims nothing and returns.
        shared(*args, 0)

    for _ in range(helpers):
        try:
            pool.submit(helper, (ctl, dst, src))
        except RuntimeError:  # the pool is shut down (closing): this thread copies all
            break
    shared(*args, 1)


def copy_pairs(dst: Sequence[np.ndarray], src: Sequence[np.ndarray]) -> None:
    """``np.copyto(dst[i], src[i])`` for C-contiguous buffers of one size, in one native call.

    Falls back to the numpy loop for buffers of mixed sizes, non-contiguous ones, or
    without the native loop.
    """
    n = len(dst)
    fn = copy_runs()
    if n == 0:
        return
    size = dst[0].nbytes
    if fn is None or n < 2 or not all(
            d.nbytes == size and s.nbytes == size and d.flags.c_contiguous
            and s.flags.c_contiguous and d.flags.writeable for d, s in zip(dst, src)):
        for d, s in zip(dst, src):
            np.copyto(d, s)
        return
    dp = np.fromiter((address(d) for d in dst), dtype=np.int64, count=n)
    sp = np.fromiter((address(s) for s in src), dtype=np.int64, count=n)
    run_copy(fn, n, dp, sp, size)


_split_lock = threading.Lock()
_split_choice: dict[int, int] = {}
#: Bytes each probe of ``copy_threads_worth`` copies, and the least speed-up (one
#: thread's time over the shared copy's) that keeps the threads: 0.9, kept unless slower.
_SPLIT_PROBE_BYTES = 16 * 2**20
_SPLIT_GAIN = 0.9


def copy_threads_worth(threads: int) -> int:
    """How many of ``threads`` copy threads to use on this machine: ``threads`` or 1.

    Measured once per process and count: a streamed 16 MiB copy between touched buffers
    in one thread and shared (``share``), interleaved; the threads are kept unless their
    best is over 10 % slower after each of up to three rounds of three. A helper that
    waits for a core holds the caller back by at most one chunk; with both cores free
    it nearly doubles a copy. Without the native loop: ``threads``.
    """
    if threads <= 1:
        return 1
    fn = copy_runs()
    if fn is None or stream_runs() is None:
        return threads
    with _split_lock:
        got = _split_choice.get(threads)
        if got is not None:
            return got
        n = _SPLIT_PROBE_BYTES
        src = np.ones(n, dtype=np.uint8)
        dst = np.ones(n, dtype=np.uint8)  # both touched: the probe times copies, not faults
        run = 256 * 1024
        k = n // run
        sp = address(src) + np.arange(k, dtype=np.int64) * run
        dp = address(dst) + np.arange(k, dtype=np.int64) * run
        old = stream_min()
        set_stream_min(0)  # both ways stream, as a batch of the manager's does
        single = split = float("inf")
        try:
            with ThreadPoolExecutor(threads - 1) as pool:
                for i in range(9):  # up to 3 rounds of 3: one busy moment must not decide
                    if i in (3, 6) and single / split >= _SPLIT_GAIN:
                        break
                    t0 = time.perf_counter()
                    run_copy(fn, k, dp, sp, run)
                    single = min(single, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    with share(pool, threads):
                        run_copy(fn, k, dp, sp, run)
                    split = min(split, time.perf_counter() - t0)
        finally:
            set_stream_min(old)
        got = threads if single / split >= _SPLIT_GAIN else 1
        log.debug("kvbm: %d copy threads: 1 thread %.2f GB/s, %d threads %.2f GB/s: using %d",
                  threads, n / single / 1e9, threads, n / split / 1e9, got)
        _split_choice[threads] = got
        return got


# -- huge pages for an engine's tensors (``engine_huge_pages`` on; 'auto': ``_huge``) ---

#: Linux ``madvise`` advice values (asm-generic, the same on x86-64 and arm64).
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
_HUGE_PAGE = 2 * 2**20
_huge_warned = False
_libc_madvise: Callable[[int, int, int], int] | None = None


def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise(addr, len, advice)`` (errno kept), or None off Linux."""
    global _libc_madvise
    if _libc_madvise is None:
        import sys

        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            f = libc.madvise
        except (OSError, AttributeError):
            return None
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        f.restype = ctypes.c_int
        _libc_madvise = f
    return _libc_madvise


def advise_huge_pages(spans: Sequence[tuple[int, int]]) -> tuple[int, str | None]:
    """Back ``(address, nbytes)`` spans of anonymous memory with 2 MiB pages, in place.

    Each span's whole 2 MiB-aligned interior is advised ``MADV_HUGEPAGE`` (future
    faults, khugepaged) and collapsed now with ``MADV_COLLAPSE`` (Linux 6.1+: the
    kernel copies each 2 MiB range into one huge page; the bytes stay the same, the
    addresses too); the two huge pages at a span's ends, which it shares with its
    allocator's neighbours, are collapsed too where the kernel agrees (best effort: a
    refusal there is not reported). A copy that walks 32 KiB runs scattered over an engine's tensors
    then needs one TLB entry per 2 MiB, not per 4 KiB, and the prefetchers are not
    stopped at every 4 KiB boundary. Returns ``(bytes collapsed, why not)``: the
    reason is None when every range was collapsed, else the first refusal
    (``madvise`` missing, an errno): the memory stays on 4 KiB pages, same bytes.
    Logged once per process at warning level.
    """
    global _huge_warned
    f = _madvise()
    why: str | None = None
    done = 0
    if f is None:
        why = "madvise is not available on this platform"
    else:
        for addr, n in spans:
            lo = -(-addr // _HUGE_PAGE) * _HUGE_PAGE
            hi = (addr + n) // _HUGE_PAGE * _HUGE_PAGE
            if hi <= lo:
                continue  # under one aligned huge page: nothing to collapse
            for advice, name in ((MADV_HUGEPAGE, "MADV_HUGEPAGE"), (MADV_COLLAPSE, "MADV_COLLAPSE")):
                if f(lo, hi - lo, advice) != 0:
                    err = ctypes.get_errno()
                    why = why or f"{name} refused ({os.strerror(err)}, errno {err})"
                    break
            else:
                done += hi - lo
                # The huge pages the span only partly covers (an allocator's neighbours
                # share them: same process, same bytes after): best effort, each alone.
                for edge, part in ((lo - _HUGE_PAGE, lo - addr), (hi, addr + n - hi)):
                    if part > 0 and all(f(edge, _HUGE_PAGE, a) == 0
                                        for a in (MADV_HUGEPAGE, MADV_COLLAPSE)):
                        done += part
    if why is not None and not _huge_warned:
        _huge_warned = True
        log.warning("kvbm: engine_huge_pages: %s; the engine's KV tensors stay on the pages "
                    "they have (same bytes, slower scattered copies)", why)
    return done, why

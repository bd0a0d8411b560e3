"""One native loop that copies a batch of memory runs: ``memcpy`` over pointer arrays.

A batch of engine-shaped blocks is thousands of separate runs (one per block, layer
and K/V half, 32 KiB each for a Llama-8B-like model): one ``np.copyto`` per run costs
about a fifth of the copy in call overhead, and the threads that split a batch then
queue for the GIL between calls. Here the runs' addresses are computed with numpy in
a few vectorised operations and one C call (``ctypes`` releases the GIL for it) copies
them all, so threads that split a batch copy in parallel without meeting again.

The loop is 10 lines of C compiled once per process with the system's C compiler
(``$CC``, else ``cc`` or ``gcc``) into a private temporary directory (mode 0700,
removed once loaded). Without a compiler ``copy_runs`` is None and callers use
their numpy paths, byte for byte the same, only slower. Nothing is cached on disk,
so no file another user could replace is ever loaded.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger("kvbm")

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
void kvbm_copy_runs(int64_t n, const int64_t *dst, const int64_t *src, int64_t len) {
    for (int64_t i = 0; i < n; i++)
        memcpy((void *)(intptr_t)dst[i], (const void *)(intptr_t)src[i], (size_t)len);
}
#define ROWS(L) for (int64_t i = 0; i < n; i++) { \
        char *d = (char *)(intptr_t)dst[i]; const char *s = (const char *)(intptr_t)src[i]; \
        for (int64_t r = 0; r < rows; r++) memcpy(d + r * dst_stride, s + r * src_stride, L); }
void kvbm_copy_rows(int64_t n, const int64_t *dst, const int64_t *src, int64_t rows,
                    int64_t len, int64_t dst_stride, int64_t src_stride) {
    /* Rows of one head_dim are short: fixed sizes let the compiler inline the copy. */
    if (len == 128) { ROWS(128) return; }
    if (len == 256) { ROWS(256) return; }
    if (len == 512) { ROWS(512) return; }
    for (int64_t i = 0; i < n; i++) {
        char *d = (char *)(intptr_t)dst[i];
        const char *s = (const char *)(intptr_t)src[i];
        for (int64_t r = 0; r < rows; r++)
            memcpy(d + r * dst_stride, s + r * src_stride, (size_t)len);
    }
}
"""

#: ``fn(n, dst_ptrs, src_ptrs, run_bytes)``: copies run ``i`` of ``run_bytes`` bytes from
#: address ``src_ptrs[i]`` to ``dst_ptrs[i]`` (pointers to int64 arrays of n addresses).
RunCopy = Callable[[int, int, int, int], None]
#: ``fn(n, dst_ptrs, src_ptrs, rows, row_bytes, dst_stride, src_stride)``: for each of
#: the n pairs, ``rows`` rows of ``row_bytes`` bytes, ``*_stride`` bytes apart.
RowCopy = Callable[[int, int, int, int, int, int, int], None]

_lock = threading.Lock()
_loaded = False
_fn: RunCopy | None = None
_rows: RowCopy | None = None
#: False turns the native loop off in this process (tests compare both paths).
enabled = True


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _build() -> tuple[RunCopy, RowCopy] | None:
    cc = _compiler()
    if cc is None:
        log.debug("kvbm: no C compiler found; engine-block copies use numpy")
        return None
    with tempfile.TemporaryDirectory(prefix="kvbm-native-") as d:
        src = os.path.join(d, "runs.c")
        lib = os.path.join(d, "runs.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        try:
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src],
                               capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.debug("kvbm: compiling the copy loop failed (%s); using numpy", e)
            return None
        if r.returncode != 0:
            log.debug("kvbm: compiling the copy loop failed (%s); using numpy",
                      r.stderr.strip()[:200])
            return None
        try:
            so = ctypes.CDLL(lib)  # mapped now: the file may go with the directory
        except OSError as e:
            log.debug("kvbm: loading the copy loop failed (%s); using numpy", e)
            return None
    fn = so.kvbm_copy_runs
    fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    rows = so.kvbm_copy_rows
    rows.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    rows.restype = None
    return fn, rows


def _load() -> None:
    global _loaded, _fn, _rows
    if not _loaded:
        with _lock:
            if not _loaded:
                built = _build()
                if built is not None:
                    _fn, _rows = built
                _loaded = True


def copy_runs() -> RunCopy | None:
    """The native run copier, built on first use; None without a C compiler (or disabled)."""
    if not enabled:
        return None
    _load()
    return _fn


def copy_rows() -> RowCopy | None:
    """The native strided copier (rows of equal length), or None as ``copy_runs``."""
    if not enabled:
        return None
    _load()
    return _rows


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
    fn(n, address(dp), address(sp), size)

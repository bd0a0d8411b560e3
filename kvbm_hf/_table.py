"""A load's address table (tier rows -> room) in one compiled call.

``CacheBlockDestination.copy_in_rows`` copies a memory tier's rows into a room: each
(block, layer, K|V) run's source is the tier's base plus its row number times the row
stride plus the run's offset in the block, its destination the room's (layer, K|V)
start plus the block's offset. Built with numpy, that is a dozen calls (the two lists
of numbers converted and range-checked, the products, two outer sums): on the request
path, right after the copies that swept the caches, they took 0.15-0.2 ms of a 6.9 ms
load of 512 blocks (docs/benchmarks/hf.md, round 10). ``kvbm_room_table`` reads the
two lists of Python ints, checks each number and writes both tables in one pass.

It answers 1 (nothing to rely on) for anything but ints in range, and the caller then
takes the numpy path, whose checks name the bad value. Compiled once per process by
``kvbm._cc`` against this interpreter's headers and loaded with ``ctypes.PyDLL`` (it
reads Python objects, so it keeps the GIL; a call takes microseconds). Without a
compiler ``load`` returns None and the numpy path is used: same tables, same bytes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from kvbm import _cc

__all__ = ["TableFn", "enabled", "load"]

#: False: copies build their tables with numpy (tests compare both).
enabled = True

SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* For j < n, k < lk: dst[j*lk + k] = room_at[k] + indices[j] * part and
 * src[j*lk + k] = rows_base + at[j] * row_stride + k * part (block-major: a block's
 * runs together, as the numpy path). 0 when every indices[j] lies in [0, num_blocks)
 * and every at[j] in [0, nrows); 1 otherwise, or for anything not an int (the tables
 * are then not to be used). ``indices`` and ``at``: lists of n items. */
int kvbm_room_table(PyObject *indices, PyObject *at, int64_t n, int64_t num_blocks,
                    int64_t nrows, int64_t rows_base, int64_t row_stride,
                    const int64_t *room_at, int64_t lk, int64_t part,
                    int64_t *dst, int64_t *src) {
    if (!PyList_CheckExact(indices) || !PyList_CheckExact(at)
            || PyList_GET_SIZE(indices) != n || PyList_GET_SIZE(at) != n)
        return 1;
    PyObject **bi = PySequence_Fast_ITEMS(indices), **ri = PySequence_Fast_ITEMS(at);
    for (int64_t j = 0; j < n; j++) {
        if (!PyLong_CheckExact(bi[j]) || !PyLong_CheckExact(ri[j])) return 1;
        int over = 0;
        long long b = PyLong_AsLongLongAndOverflow(bi[j], &over);
        if (over || b < 0 || b >= num_blocks) return 1;
        long long r = PyLong_AsLongLongAndOverflow(ri[j], &over);
        if (over || r < 0 || r >= nrows) return 1;
        int64_t d = b * part, s = rows_base + r * row_stride;
        for (int64_t k = 0; k < lk; k++) {
            dst[j * lk + k] = room_at[k] + d;
            src[j * lk + k] = s + k * part;
        }
    }
    return 0;
}
"""

#: ``fn(indices, at, n, num_blocks, nrows, rows_base, row_stride, room_at, lk, part, dst,
#: src)`` (the last four addresses but ``lk`` and ``part``): 0 when the tables were written.
TableFn = Callable[[Any, Any, int, int, int, int, int, int, int, int, int, int], int]


def _build() -> TableFn | None:
    lib = _cc.build(SOURCE, "the room's load table", "numpy tables", capi=True)
    if lib is None:
        return None
    f = lib.kvbm_room_table
    f.argtypes = [ctypes.py_object, ctypes.py_object] + [ctypes.c_int64] * 5 \
        + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.c_int
    return f


_fn = _cc.Once(_build)


def load() -> TableFn | None:
    """The compiled table builder (compiled at the first call), or None when it cannot be
    built or ``enabled`` is False."""
    return _fn() if enabled else None

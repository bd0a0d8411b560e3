"""A prompt's chained xxh3-128 block hashes in one compiled call.

``BlockHasher.hash_tokens`` computes ``h_i = xxh3_128(h_{i-1} || tokens_i)`` block by
block; in Python each block costs a slice, a concatenation, ``xxh3_128_digest`` and a
loop step (~0.3 µs: 0.16 ms for the 512 blocks of an 8K prompt), of which the hash
itself is a tenth. ``kvbm_chain128`` runs the whole chain in C: each block's input
assembled in one buffer, hashed by python-xxhash's own ``XXH3_128bits`` (its extension
module exports the C symbols, as ``kvbm_tiers_disk._xxh`` uses for xxh3-64), the
digest written in xxhash's canonical form (big-endian high 64 bits, then the low 64:
what ``xxh3_128_digest`` returns) and the list of ``bytes`` built in the same call.

At load every candidate entry point (the SIMD dispatcher, then the baseline build)
is compiled in and checked against the Python loop on test vectors (empty, partial
and long inputs, page sizes whose blocks take each of XXH3's input-length paths, a
parent); any difference, a missing symbol or no compiler, and ``load`` returns None:
``BlockHasher`` keeps the Python loop, which gives the same hashes.

The call keeps the GIL (``ctypes.PyDLL``: it builds Python objects) and takes a few
microseconds for an 8K prompt.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable

import numpy as np
import xxhash

from kvbm import _cc

__all__ = ["Chain64Fn", "ChainFn", "enabled", "implementation", "load", "load64", "python_chain"]

#: False: hashers use the Python loop (tests compare both).
enabled = True

#: Entry points in order of preference: the SIMD dispatcher, then the baseline build.
SYMBOLS = ("XXH3_128bits_dispatch", "XXH3_128bits")

SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t low64, high64; } xxh128_t;  /* XXH128_hash_t */
typedef xxh128_t (*xxh128_fn)(const void *, size_t);

static void put_be64(char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (char)(v & 0xff); v >>= 8; }
}

/* Hash ``buf`` (the parent's 16 bytes, then ``step`` bytes of a block), write the
 * digest in canonical form over the parent for the next block, and store it as item
 * ``i`` of ``out``; -1 (an exception set) when memory runs out. */
static int store_link(xxh128_fn fn, char *buf, size_t step, PyObject *out, Py_ssize_t i) {
    xxh128_t h = fn(buf, 16 + step);
    put_be64(buf, h.high64);
    put_be64(buf + 8, h.low64);
    PyObject *b = PyBytes_FromStringAndSize(buf, 16);
    if (b == NULL) return -1;
    PyList_SET_ITEM(out, i, b);
    return 0;
}

/* The chained hashes of the n blocks of ``step`` bytes at ``raw`` (each the hash of
 * the previous one's 16 bytes, or ``parent``'s for the first, then the block's bytes)
 * as a new list of 16-byte bytes; NULL (an exception set) when memory runs out. */
PyObject *kvbm_chain128(void *fnp, const char *raw, Py_ssize_t n, Py_ssize_t step,
                        const char *parent) {
    xxh128_fn fn = (xxh128_fn)fnp;
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    char small[16 + 1024];
    char *buf = (size_t)step <= sizeof small - 16 ? small : (char *)malloc(16 + (size_t)step);
    if (buf == NULL) { Py_DECREF(out); return PyErr_NoMemory(); }
    memcpy(buf, parent, 16);
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(buf + 16, raw + i * step, (size_t)step);
        if (store_link(fn, buf, (size_t)step, out, i) < 0) {
            if (buf != small) free(buf);
            Py_DECREF(out);
            return NULL;
        }
    }
    if (buf != small) free(buf);
    return out;
}

/* kvbm_chain128 of int64 token ids (``len`` of them, the first n * page in n blocks),
 * each written as its u32 little-endian bytes; None (nothing hashed) when any of the
 * ``len`` ids lies outside [0, 2**32): the caller's Python path then names it. */
PyObject *kvbm_chain128_i64(void *fnp, const int64_t *ids, Py_ssize_t len, Py_ssize_t n,
                            Py_ssize_t page, const char *parent) {
    for (Py_ssize_t i = 0; i < len; i++)
        if ((uint64_t)ids[i] >> 32) Py_RETURN_NONE;
    xxh128_fn fn = (xxh128_fn)fnp;
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    size_t step = 4 * (size_t)page;
    char small[16 + 1024];
    char *buf = step <= sizeof small - 16 ? small : (char *)malloc(16 + step);
    if (buf == NULL) { Py_DECREF(out); return PyErr_NoMemory(); }
    memcpy(buf, parent, 16);
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t *t = ids + i * page;
        unsigned char *w = (unsigned char *)buf + 16;
        for (Py_ssize_t j = 0; j < page; j++, w += 4) {
            uint32_t v = (uint32_t)t[j];
            w[0] = (unsigned char)v; w[1] = (unsigned char)(v >> 8);
            w[2] = (unsigned char)(v >> 16); w[3] = (unsigned char)(v >> 24);
        }
        if (store_link(fn, buf, step, out, i) < 0) {
            if (buf != small) free(buf);
            Py_DECREF(out);
            return NULL;
        }
    }
    if (buf != small) free(buf);
    return out;
}
"""

#: ``chain(raw, n, step, parent)``: the hashes of ``n`` blocks of ``step`` bytes of
#: ``raw`` chained from the 16-byte ``parent``.
ChainFn = Callable[[bytes, int, int, bytes], "list[bytes]"]
#: ``chain64(ids, n, page, parent)``: the same chain over an int64 array of token ids
#: (C-contiguous; ``n`` blocks of ``page`` ids), each id hashed as its u32 LE bytes;
#: None when any id of ``ids`` lies outside [0, 2**32).
Chain64Fn = Callable[[np.ndarray, int, int, bytes], "list[bytes] | None"]


def python_chain(raw: bytes, n: int, step: int, parent: bytes) -> list[bytes]:
    """The chain in Python (``BlockHasher``'s loop): what the compiled one must give."""
    digest = xxhash.xxh3_128_digest
    prev = parent
    out: list[bytes] = []
    for i in range(n):
        prev = digest(prev + raw[i * step : (i + 1) * step])
        out.append(prev)
    return out


def _probes() -> list[tuple[bytes, int, int, bytes]]:
    """Chains whose blocks take each of XXH3's paths (inputs of 16+step bytes: 17-128,
    129-240 and long ones ending mid-stripe), with and without blocks, and parents."""
    pattern = bytes((i * 131 + 7) % 256 for i in range(8192))
    out = []
    for page in (1, 4, 16, 28, 56, 64, 255, 300):
        step = page * 4
        for n in (0, 1, 3):
            out.append((pattern[: n * step + 4], n, step, bytes(range(16))))
            out.append((pattern[8 : 8 + n * step], n, step, b"\xff" * 16))
    return out


def _candidates() -> list[str]:
    here = os.path.dirname(xxhash.__file__)
    return sorted(glob.glob(os.path.join(here, "_xxhash*.so"))) + ["libxxhash.so.0"]


def _verified(chain: ChainFn) -> bool:
    return all(chain(*p) == python_chain(*p) for p in _probes())


def _verified64(chain64: Chain64Fn) -> bool:
    """The probes' chains from int64 ids, and None for an id below 0 or from 2**32 on."""
    for raw, n, step, parent in _probes():
        ids = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        if chain64(ids, n, step // 4, parent) != python_chain(raw, n, step, parent):
            return False
    bad = [np.array([1, 2, 3, v], dtype=np.int64) for v in (-1, 2**32, -(2**63))]
    return all(chain64(b, 1, 2, bytes(16)) is None for b in bad)


def _find(lib: ctypes.CDLL, paths: list[str]) -> tuple[ChainFn, Chain64Fn, str] | None:
    """The first entry point (library by library, ``SYMBOLS`` in order) whose chains
    (from bytes and from int64 ids) equal the Python loop's on every probe, with its
    name; None if none does."""
    f = lib.kvbm_chain128
    f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ssize_t, ctypes.c_ssize_t,
                  ctypes.c_char_p]
    f.restype = ctypes.py_object
    f64 = lib.kvbm_chain128_i64
    f64.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_ssize_t,
                    ctypes.c_ssize_t, ctypes.c_char_p]
    f64.restype = ctypes.py_object
    for path in paths:
        try:
            xlib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in SYMBOLS:
            h = getattr(xlib, sym, None)
            if h is None:
                continue
            addr = ctypes.cast(h, ctypes.c_void_p).value

            def chain(raw: bytes, n: int, step: int, parent: bytes,
                      _f: Callable[..., list[bytes]] = f, _a: int | None = addr) -> list[bytes]:
                return _f(_a, raw, n, step, parent)

            def chain64(ids: np.ndarray, n: int, page: int, parent: bytes,
                        _f: Callable[..., list[bytes] | None] = f64,
                        _a: int | None = addr) -> list[bytes] | None:
                return _f(_a, ids.__array_interface__["data"][0], len(ids), n, page, parent)

            if _verified(chain) and _verified64(chain64):
                return chain, chain64, f"{os.path.basename(path)}:{sym}"
    return None


def _find_in(paths: list[str]) -> tuple[ChainFn, Chain64Fn, str] | None:
    """``_find`` over ``paths`` with the compiled chain; None without a compiler."""
    lib = _cc.build(SOURCE, "the chained block hasher", "the Python loop", capi=True)
    return None if lib is None else _find(lib, paths)


#: The checked chains and their entry point's name, built at the first call (or None).
_found = _cc.Once(lambda: _find_in(_candidates()))


def load() -> ChainFn | None:
    """The compiled, checked chain (built at the first call), or None when it cannot be
    built, gives a different hash on a probe, or ``enabled`` is False."""
    found = _found() if enabled else None
    return None if found is None else found[0]


def load64() -> Chain64Fn | None:
    """The compiled chain over int64 ids (``Chain64Fn``; built and checked with
    ``load``'s), or None as ``load``."""
    found = _found() if enabled else None
    return None if found is None else found[1]


def implementation() -> str:
    """Which code chains xxh3-128 hashes: ``<library>:<symbol>``, or ``Python loop``."""
    found = _found()
    return found[2] if enabled and found is not None else "Python loop"

"""The planner's batch allocation: ``allocate_run`` makes a save's slot allocations
(and the evictions they need) in one compiled call where the registry is the common
one, else ``BlockRegistry.allocate`` per key, with the same slots, evictions, counts
and LRU order. Kept beside the planner, its only caller; it reads the registry's
record layout through ``kvbm._registry_native``'s parameters."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from . import _cc, _registry_native
from .hashing import SequenceHash
from .registry import BlockRegistry

_ALLOC_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The registry's parameters (kvbm._registry_native.PARAMS, in that order). */
enum { P_INDEX, P_HOME_MASK, P_MASK, P_SLOT_MASK, P_BITS, P_TAG_SHIFT, P_TAG_MASK,
       P_BUCKET, P_RECORDS, P_STRIDE, P_STATE_OFF, P_REGISTERED, P_LRU, P_PINS_OFF,
       P_PREV_OFF, P_NEXT_OFF, P_END, P_CAPACITY };
/* The free stack and the counters (in and out): ring address, bottom, free slots,
 * change of the LRU's evictable count, evictions. */
enum { S_RING, S_BOTTOM, S_NFREE, S_LRU_N, S_EVICTIONS };

#define I32(rec, off) (*(int32_t *)((rec) + (off)))

static inline uint64_t key_hash(const char *k) {
    return (uint64_t)_Py_HashBytes(k, 16);  /* hash(bytes) of these 16 bytes */
}

/* BlockRegistry.allocate for each key of ``keys`` (a list of 16-byte bytes) in turn,
 * with its evictions (BlockRegistry.evict with the core LRU in the records, pinned
 * blocks the list hands out passed over): a list of slots, None where the key is held
 * already or no slot could be freed. Stops early (a shorter list) at a key that is not
 * exactly 16 bytes of bytes: the caller's Python path takes the rest. Every evicted
 * (key, slot) is appended to ``evicted``. Python objects are made only after every
 * record, index entry and list link is written (an allocation may run the collector,
 * and so Python code). */
PyObject *kvbm_allocate_run(PyObject *keys, const int64_t *p, int64_t *st, PyObject *evicted) {
    if (!PyList_CheckExact(keys) || !PyList_CheckExact(evicted)) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    PyObject **items = PySequence_Fast_ITEMS(keys);
    int32_t *got = PyMem_Malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    int32_t *ev = PyMem_Malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    char *evk = PyMem_Malloc(16 * (size_t)(n ? n : 1));
    if (!got || !ev || !evk) {
        PyMem_Free(got); PyMem_Free(ev); PyMem_Free(evk);
        return PyErr_NoMemory();
    }
    int32_t *index = (int32_t *)(intptr_t)p[P_INDEX];
    const uint64_t home_mask = (uint64_t)p[P_HOME_MASK], mask = (uint64_t)p[P_MASK];
    const int32_t slot_mask = (int32_t)p[P_SLOT_MASK];
    const int bits = (int)p[P_BITS], tag_shift = (int)p[P_TAG_SHIFT];
    const uint64_t tag_mask = (uint64_t)p[P_TAG_MASK];
    char *recs = (char *)(intptr_t)p[P_RECORDS];
    const int64_t stride = p[P_STRIDE], state_off = p[P_STATE_OFF];
    const int64_t pins_off = p[P_PINS_OFF], prev_off = p[P_PREV_OFF], next_off = p[P_NEXT_OFF];
    const int32_t end = (int32_t)p[P_END];
    const int64_t cap = p[P_CAPACITY];
    int32_t *ring = (int32_t *)(intptr_t)st[S_RING];
    const int64_t bottom = st[S_BOTTOM];
    int64_t nfree = st[S_NFREE], lru_n = 0, nev = 0;
    char *sentinel = recs + (int64_t)end * stride;
    Py_ssize_t done = 0;
    for (; done < n; done++) {
        PyObject *k = items[done];
        if (!PyBytes_CheckExact(k) || PyBytes_GET_SIZE(k) != 16) break;
        const char *kb = PyBytes_AS_STRING(k);
        uint64_t h = (uint64_t)PyObject_Hash(k);  /* cached in the bytes object */
        /* held already (registered or being written)? */
        uint64_t i = h & home_mask;
        int32_t e, found = 0;
        while ((e = index[i]) >= 0) {
            if (memcmp(recs + (int64_t)(e & slot_mask) * stride, kb, 16) == 0) { found = 1; break; }
            i = (i + 1) & mask;
        }
        if (found) { got[done] = -1; continue; }
        if (nfree == 0) {
            /* evict: the LRU's head, passing over blocks pinned in place */
            int32_t v;
            for (;;) {
                v = I32(sentinel, next_off);
                if (v == end) { v = -1; break; }
                char *r = recs + (int64_t)v * stride;
                int32_t nx = I32(r, next_off);
                I32(sentinel, next_off) = nx;
                I32(recs + (int64_t)nx * stride, prev_off) = end;
                I32(r, next_off) = -1;
                if (I32(r, pins_off) == 0) { lru_n--; break; }
                /* pinned: out of the list now, the count as it was (victim_slot's
                 * decrement and the registry's increment) */
            }
            if (v < 0) { got[done] = -1; continue; }
            char *vr = recs + (int64_t)v * stride;
            /* its index entry, then the rest of the cluster shifted back (SlotKeys.remove) */
            uint64_t a = key_hash(vr) & home_mask;
            while ((e = index[a]) < 0 || (e & slot_mask) != v) a = (a + 1) & mask;
            uint64_t j = a;
            for (;;) {
                j = (j + 1) & mask;
                e = index[j];
                if (e < 0) break;
                uint64_t home = key_hash(recs + (int64_t)(e & slot_mask) * stride) & home_mask;
                if (((j - home) & mask) >= ((j - a) & mask)) { index[a] = e; a = j; }
            }
            index[a] = -1;
            memcpy(evk + 16 * nev, vr, 16);
            ev[nev++] = v;
            *(int8_t *)(vr + state_off) = 0;  /* FREE */
            ring[(bottom + nfree) % cap] = v;
            nfree++;
        }
        nfree--;
        int32_t s = ring[(bottom + nfree) % cap];
        char *r = recs + (int64_t)s * stride;
        *(int8_t *)(r + state_off) = 1;  /* WRITING */
        i = h & home_mask;
        while (index[i] >= 0) i = (i + 1) & mask;
        index[i] = (int32_t)(s | (int32_t)(((h >> bits) & tag_mask) << tag_shift));
        memcpy(r, kb, 16);
        got[done] = s;
    }
    st[S_NFREE] = nfree;
    st[S_LRU_N] = lru_n;
    st[S_EVICTIONS] = nev;
    PyObject *out = PyList_New(done);
    for (Py_ssize_t q = 0; out != NULL && q < done; q++) {
        PyObject *v = got[q] < 0 ? Py_NewRef(Py_None) : PyLong_FromLong(got[q]);
        if (v == NULL) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, q, v);
    }
    for (int64_t q = 0; out != NULL && q < nev; q++) {
        PyObject *t = Py_BuildValue("(y#l)", evk + 16 * q, (Py_ssize_t)16, (long)ev[q]);
        if (t == NULL || PyList_Append(evicted, t) < 0) { Py_XDECREF(t); Py_CLEAR(out); break; }
        Py_DECREF(t);
    }
    PyMem_Free(got); PyMem_Free(ev); PyMem_Free(evk);
    return out;
}
"""


#: ``fn(keys, params, state, evicted)``: ``kvbm_allocate_run`` (see its comment).
_AllocFn = Callable[[list[Any], int, int, list[Any]], "list[int | None] | None"]
#: False: plans allocate one block at a time (``BlockRegistry.allocate``; tests compare).
native_allocate = True


def _build() -> _AllocFn | None:
    lib = _cc.build(_ALLOC_SOURCE, "the planner's batch allocation", "one allocate call a block",
                    capi=True)
    if lib is None:
        return None
    f = lib.kvbm_allocate_run
    f.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.py_object]
    f.restype = ctypes.py_object
    return f


_alloc = _cc.Once(_build)


def _alloc_fn() -> _AllocFn | None:
    """The compiled batch allocation (built at the first call), or None."""
    if not native_allocate or not _registry_native.enabled:
        return None
    return _alloc()


def allocate_run(reg: BlockRegistry, keys: list[SequenceHash]) -> list[int | None]:
    """``[reg.allocate(k) for k in keys]``, in one compiled call where the registry is
    the common one (16-byte keys, the core LRU in its records, no events to emit, no
    doomed block): each allocate and eviction about 5 us in Python, a whole batch a
    few us here. The same slots, evictions, counts and list order as the Python calls
    (tests compare both on the same operations); any other registry, or a key the call
    does not take, goes through ``allocate``."""
    fn = _alloc_fn()
    native = reg._native
    lru = reg._lru
    if (fn is None or native is None or lru is None or not reg._bytes or reg._doomed
            or len(keys) < 2 or (reg._events is not None and reg._events.active)):
        return [reg.allocate(k) for k in keys]
    st, at = reg.alloc_state()  # kept by the registry: no array (and ctypes) made a call
    evicted: list[tuple[SequenceHash, int]] = []
    try:
        got = fn(keys, native[1], at, evicted)
    finally:
        reg._nfree = int(st[2])
        lru._n += int(st[3])
        reg.evictions += int(st[4])
        reg.last_evicted.extend(evicted)
    out: list[int | None] = got if got is not None else []
    if len(out) < len(keys):
        out.extend(reg.allocate(k) for k in keys[len(out):])
    return out

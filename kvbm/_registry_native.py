"""A prefix's lookups in one compiled call, their memory reads issued together.

In a registry of ten million blocks the index and the slot records (~500 MB) lie far
outside the caches: a key costs two random memory reads (its index bucket, then the
record of the slot its entry names), and looked up one after another the 64 keys of a
prefix cost 128 memory latencies. All the keys of a prefix are known before the
lookup, so ``kvbm_find_run`` issues those reads in passes, up to 64 keys at a time:
the hash and bucket address of every key, each bucket prefetched; then every bucket
read and the record of each entry whose tag is the key's prefetched; then the keys
probed and compared in order (the lines now in the cache), up to the first miss. With
the registry's state at hand, blocks saved together cost no index read: the first key
is looked up alone, and while the slot after the last one found is registered and
holds the next key, that is its slot. With the registry's LRU in the records
(``BlockRegistry``), the same call then pins the run: a block's first pin takes it
out of the evictable count but leaves it in place in the LRU list, so that no list
neighbour's line is read or written on a match (the registry finishes the unlink
lazily: at the block's last unpin, or when the list hands it as a victim).
(Measured on the helper VM, out-of-order execution already overlaps most of the
probes; what is left is the cost of each random line: docs/benchmarks/registry.md.)

The answer is the Python path's, key for key (``SlotKeys.find_canon``: whole 16-byte
compares, the linear probe from the key's home to the first empty entry; an entry's
tag only rules it out), and the pins, evictable count and eviction order are those of
the registry's ``_pin_found`` with ``LRUPolicy``'s eager ``pin_slot``. Tests run both
paths on the same tables (``tests/test_registry_run.py``, the registry machine).

The C source is compiled once per process by ``kvbm._cc`` (system compiler, private
temporary directory, nothing cached on disk) against this interpreter's headers: it
reads the keys' ``bytes`` and their cached ``hash`` through the C API, so it is loaded
with ``ctypes.PyDLL`` and keeps the GIL. That is deliberate: a call takes a few
microseconds, and handing the GIL round for it (as ``ctypes.CDLL`` does) lets a busy
background thread (a tier's copies) take it for its whole switch interval before the
match goes on. Without a compiler or the headers, ``load`` returns None and the
registry keeps its numpy and Python paths, which give the same results.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from kvbm import _cc

if TYPE_CHECKING:
    from kvbm.registry import BlockRegistry

__all__ = ["P_COUNT", "PARAMS", "CommitFn", "RunFn", "UnpinFn", "all_keys", "commit_fn", "enabled",
           "load", "unpin_fn", "unpin_run"]

#: False: registries made from now on use the numpy and Python paths (tests compare both).
enabled = True

# The parameters of a table, one int64 each, in this order (``SlotKeys.native_params``
# fills the lookup's, ``BlockRegistry`` the rest).
PARAMS = ("index", "home_mask", "mask", "slot_mask", "bits", "tag_shift", "tag_mask",
          "bucket", "records", "stride", "state_off", "registered", "lru", "pins_off",
          "prev_off", "next_off", "end", "capacity")
P_COUNT = len(PARAMS)

SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { P_INDEX, P_HOME_MASK, P_MASK, P_SLOT_MASK, P_BITS, P_TAG_SHIFT, P_TAG_MASK,
       P_BUCKET, P_RECORDS, P_STRIDE, P_STATE_OFF, P_REGISTERED, P_LRU, P_PINS_OFF,
       P_PREV_OFF, P_NEXT_OFF, P_END, P_CAPACITY };

/* Keys looked up per round of passes: enough misses in flight to fill the core's
 * line-fill buffers several times over, few enough for the stack. */
#define CHUNK 64

static inline int same16(const char *a, const char *b) {
    uint64_t a0, a1, b0, b1;
    memcpy(&a0, a, 8); memcpy(&a1, a + 8, 8);
    memcpy(&b0, b, 8); memcpy(&b1, b + 8, 8);
    return ((a0 ^ b0) | (a1 ^ b1)) == 0;
}

#define I32(rec, off) (*(int32_t *)((rec) + (off)))

/* The slots of the longest prefix of ``keys`` (a list of 16-byte bytes) whose keys are
 * indexed (and, with P_STATE_OFF >= 0, whose state is P_REGISTERED), as a new list;
 * with P_LRU, each is also pinned, and *unlinked counts the blocks that left the
 * evictable set (first pins; they stay in the LRU list, see BlockRegistry). None when
 * a key is not exactly a 16-byte bytes (the caller's Python path decides then). */
PyObject *kvbm_find_run(PyObject *keys, const int64_t *p, int64_t *unlinked) {
    *unlinked = 0;
    if (!PyList_CheckExact(keys)) Py_RETURN_NONE;
    /* The one allocation that may run the garbage collector (and so Python code) comes
     * first: from here on nothing but this call touches the keys or the records. */
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    PyObject **items = PySequence_Fast_ITEMS(keys);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyBytes_CheckExact(items[i]) || PyBytes_GET_SIZE(items[i]) != 16) {
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
    const int32_t *index = (const int32_t *)(intptr_t)p[P_INDEX];
    const uint64_t home_mask = (uint64_t)p[P_HOME_MASK], mask = (uint64_t)p[P_MASK];
    const int32_t slot_mask = (int32_t)p[P_SLOT_MASK];
    const int bits = (int)p[P_BITS], tag_shift = (int)p[P_TAG_SHIFT];
    const uint64_t tag_mask = (uint64_t)p[P_TAG_MASK];
    const int64_t bucket = p[P_BUCKET];
    char *recs = (char *)(intptr_t)p[P_RECORDS];
    const int64_t stride = p[P_STRIDE], state_off = p[P_STATE_OFF];
    const int8_t registered = (int8_t)p[P_REGISTERED];
    const int lru = (int)p[P_LRU];
    /* P_PREV_OFF and P_END: the list's other link and sentinel, not touched here */
    const int64_t pins_off = p[P_PINS_OFF], next_off = p[P_NEXT_OFF];
    const int64_t capacity = p[P_CAPACITY];
    uint64_t home[CHUNK];
    int32_t tag[CHUNK], slot[CHUNK];
    const char *kb[CHUNK];
    int64_t unl = 0;
    int32_t prev = -1;  /* the slot of the last key found */
    for (Py_ssize_t start = 0; start < n;) {
        int m = (int)(n - start < CHUNK ? n - start : CHUNK), found = 0, ended = 0;
        /* Blocks saved together sit in consecutive slots: while the slot after the last
         * one found holds the next key and is registered, that is the key's slot (a
         * registered slot's key is indexed there), with no index read. Only with the
         * state at hand: a free slot keeps the key it last held. */
        if (state_off >= 0 && prev >= 0) {
            for (; found < m && prev + 1 < capacity; found++) {
                const char *r = recs + (int64_t)(prev + 1) * stride;
                if (!same16(r, PyBytes_AS_STRING(items[start + found]))
                        || *(const int8_t *)(r + state_off) != registered)
                    break;
                slot[found] = ++prev;
            }
        }
        if (found == 0) {
            /* The index, for a chunk of keys at once; the first key of the run alone
             * (its next may be in the slot after its own: then no bucket is read). */
            if (state_off >= 0 && prev < 0) m = 1;
            /* 1: every key's hash (cached in the bytes object) and home bucket, prefetched */
            for (int i = 0; i < m; i++) {
                PyObject *k = items[start + i];
                uint64_t h = (uint64_t)PyObject_Hash(k);  /* never fails for bytes */
                kb[i] = PyBytes_AS_STRING(k);
                home[i] = h & home_mask;
                tag[i] = (int32_t)((h >> bits) & tag_mask);
                __builtin_prefetch(index + home[i], 0, 3);
            }
            /* 2: each bucket read; the record of each entry carrying the key's tag
             * prefetched (for writing: the run is then pinned) */
            for (int i = 0; i < m; i++) {
                const int32_t *b = index + home[i];
                for (int64_t j = 0; j < bucket; j++) {
                    int32_t e = b[j];
                    if (e < 0) break;
                    if ((e >> tag_shift) == tag[i])
                        __builtin_prefetch(recs + (int64_t)(e & slot_mask) * stride, 1, 3);
                }
            }
            /* 3: in order, the probe from each key's home to the first empty entry,
             * whole keys compared; the run ends at the first key not found (or not
             * registered) */
            for (; found < m; found++) {
                uint64_t i = home[found];
                int32_t e, s = -1;
                while ((e = index[i]) >= 0) {
                    if ((e >> tag_shift) == tag[found]) {
                        int32_t c = e & slot_mask;
                        if (same16(recs + (int64_t)c * stride, kb[found])) { s = c; break; }
                    }
                    i = (i + 1) & mask;
                }
                if (s < 0 || (state_off >= 0
                              && *(int8_t *)(recs + (int64_t)s * stride + state_off) != registered))
                    break;
                slot[found] = s;
            }
            ended = found < m;
            if (found) prev = slot[found - 1];
        }
        if (lru) {
            /* 4: pin each block. A block's first pin takes it out of the evictable set
             * but leaves it where it is in the LRU list (its neighbours' lines are not
             * touched): the registry skips a pinned block the list hands it as victim
             * (then out of the list) and moves a listed one to the tail at its last
             * unpin, so the order of the evictable blocks is the eager unlink's. A
             * later pin of a pinned block changes nothing (its place is set at unpin). */
            for (int i = 0; i < found; i++) {
                char *r = recs + (int64_t)slot[i] * stride;
                int32_t c = I32(r, pins_off);
                I32(r, pins_off) = c + 1;
                if (c == 0 && I32(r, next_off) >= 0) unl++;
            }
        }
        for (int i = 0; i < found; i++) {
            PyObject *v = PyLong_FromLong(slot[i]);
            if (v == NULL || PyList_Append(out, v) < 0) {
                Py_XDECREF(v);
                Py_DECREF(out);
                *unlinked = unl;
                return NULL;
            }
            Py_DECREF(v);
        }
        start += found;
        if (ended) break;
    }
    *unlinked = unl;
    return out;
}

/* ``BlockRegistry.commit`` of every slot of ``slots`` (a list of ints), in order, with
 * the core LRU's links in the records: each WRITING slot becomes registered and, with
 * ``pinned``, holds one pin (out of the LRU list), else is linked at the list's tail
 * (LRUPolicy's insert_slot, then pin_slot when pinned). *listed: the change of the
 * evictable count. Returns -1 when all are committed, else the position from which the
 * caller's per-slot commit goes on (and asserts): 0 with nothing done when an item is
 * no int, out of range or not WRITING; a repeated slot's second position (the ones
 * before it committed). One pass to check, one to commit: no Python per block. */
Py_ssize_t kvbm_commit_run(PyObject *slots, const int64_t *p, int64_t writing, int64_t pinned,
                           int64_t *listed) {
    *listed = 0;
    if (!PyList_CheckExact(slots)) return 0;
    Py_ssize_t n = PyList_GET_SIZE(slots);
    PyObject **items = PySequence_Fast_ITEMS(slots);
    char *recs = (char *)(intptr_t)p[P_RECORDS];
    const int64_t stride = p[P_STRIDE], state_off = p[P_STATE_OFF], end = p[P_END];
    const int64_t pins_off = p[P_PINS_OFF], prev_off = p[P_PREV_OFF], next_off = p[P_NEXT_OFF];
    for (Py_ssize_t i = 0; i < n; i++) {
        int overflow = 0;
        long s = PyLong_CheckExact(items[i]) ? PyLong_AsLongAndOverflow(items[i], &overflow) : -1;
        if (overflow || s < 0 || s >= end
                || *(int8_t *)(recs + (int64_t)s * stride + state_off) != (int8_t)writing)
            return 0;
    }
    char *e = recs + end * stride;  /* the list's sentinel */
    int64_t d = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t s = (int32_t)PyLong_AsLong(items[i]);
        char *r = recs + (int64_t)s * stride;
        if (*(int8_t *)(r + state_off) != (int8_t)writing) { *listed = d; return i; }
        *(int8_t *)(r + state_off) = (int8_t)p[P_REGISTERED];
        int32_t nx = I32(r, next_off);
        if (pinned) {
            I32(r, pins_off) = 1;
            if (nx >= 0) {  /* listed already: pin_slot's unlink */
                int32_t pv = I32(r, prev_off);
                I32(recs + (int64_t)pv * stride, next_off) = nx;
                I32(recs + (int64_t)nx * stride, prev_off) = pv;
                I32(r, next_off) = -1;
                d--;
            }
        } else if (nx < 0) {
            int32_t tail = I32(e, prev_off);
            I32(recs + (int64_t)tail * stride, next_off) = s;
            I32(r, prev_off) = tail;
            I32(r, next_off) = (int32_t)end;
            I32(e, prev_off) = s;
            d++;
        }
    }
    *listed = d;
    return -1;
}

/* ``BlockRegistry.unpin`` of every slot of ``slots`` (a list of ints), in order, with the
 * core LRU's links in the records and no doomed block: one pin dropped from each; at a
 * block's last pin it is evictable again, at the list's tail (LRUPolicy's unpin_slot:
 * moved there if pin_run left it in place, else linked there). *listed: the change of
 * the evictable count. Returns -1 when all are done, else the position from which the
 * caller's per-slot unpin goes on (and asserts): 0 with nothing done when an item is no
 * int or out of range; the position of a slot that holds no pin when its turn comes
 * (the ones before it done). */
Py_ssize_t kvbm_unpin_run(PyObject *slots, const int64_t *p, int64_t *listed) {
    *listed = 0;
    if (!PyList_CheckExact(slots)) return 0;
    Py_ssize_t n = PyList_GET_SIZE(slots);
    PyObject **items = PySequence_Fast_ITEMS(slots);
    char *recs = (char *)(intptr_t)p[P_RECORDS];
    const int64_t stride = p[P_STRIDE], end = p[P_END];
    const int64_t pins_off = p[P_PINS_OFF], prev_off = p[P_PREV_OFF], next_off = p[P_NEXT_OFF];
    for (Py_ssize_t i = 0; i < n; i++) {
        int overflow = 0;
        long s = PyLong_CheckExact(items[i]) ? PyLong_AsLongAndOverflow(items[i], &overflow) : -1;
        if (overflow || s < 0 || s >= end) return 0;
    }
    char *e = recs + end * stride;  /* the list's sentinel */
    int64_t d = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t s = (int32_t)PyLong_AsLong(items[i]);
        char *r = recs + (int64_t)s * stride;
        int32_t c = I32(r, pins_off);
        if (c <= 0) { *listed = d; return i; }
        I32(r, pins_off) = c - 1;
        if (c != 1) continue;
        d++;
        int32_t nx = I32(r, next_off);
        if (nx == (int32_t)end) continue;  /* in place at the tail already */
        if (nx >= 0) {  /* pinned in place: unlinked from where it is */
            int32_t pv = I32(r, prev_off);
            I32(recs + (int64_t)pv * stride, next_off) = nx;
            I32(recs + (int64_t)nx * stride, prev_off) = pv;
        }
        int32_t tail = I32(e, prev_off);
        I32(recs + (int64_t)tail * stride, next_off) = s;
        I32(r, prev_off) = tail;
        I32(r, next_off) = (int32_t)end;
        I32(e, prev_off) = s;
    }
    *listed = d;
    return -1;
}

/* Whether every item of ``keys`` (a list) is exactly a bytes of 16 bytes: the manager's
 * check of a match's hashes in one pass (1, else 0: the caller's Python check then
 * decides, and names the first bad item). */
int kvbm_all_keys(PyObject *keys) {
    if (!PyList_CheckExact(keys)) return 0;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    PyObject **items = PySequence_Fast_ITEMS(keys);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyBytes_CheckExact(items[i]) || PyBytes_GET_SIZE(items[i]) != 16) return 0;
    return 1;
}
"""

#: ``run(keys, params, unlinked)``: ``keys`` a list, ``params`` the address of the table's
#: int64 parameters, ``unlinked`` that of one int64; a list of slots, or None.
RunFn = Callable[[list[Any], int, int], "list[int] | None"]

#: ``commit(slots, params, writing, pinned, listed)``: ``kvbm_commit_run``.
CommitFn = Callable[[list[int], int, int, int, int], int]
#: ``unpin(slots, params, listed)``: ``kvbm_unpin_run``.
UnpinFn = Callable[[list[int], int, int], int]


class _Lib(NamedTuple):
    find: RunFn
    all_keys: Callable[[list[Any]], int]
    commit: CommitFn
    unpin: UnpinFn


def _build() -> _Lib | None:
    lib = _cc.build(SOURCE, "the registry's prefix lookup", "numpy and Python lookups",
                    capi=True)
    if lib is None:
        return None
    f = lib.kvbm_find_run
    f.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.py_object
    c = lib.kvbm_all_keys
    c.argtypes = [ctypes.py_object]
    c.restype = ctypes.c_int
    m = lib.kvbm_commit_run
    m.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    m.restype = ctypes.c_ssize_t
    u = lib.kvbm_unpin_run
    u.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p]
    u.restype = ctypes.c_ssize_t
    return _Lib(f, c, m, u)


_lib = _cc.Once(_build)


def load() -> RunFn | None:
    """The compiled lookup (compiled at the first call), or None when it cannot be built
    or ``enabled`` is False."""
    lib = _lib() if enabled else None
    return None if lib is None else lib.find


def all_keys(keys: list[Any]) -> bool:
    """True when every item of ``keys`` is exactly a 16-byte ``bytes`` (one compiled
    pass, ~0.3 µs for 64 keys against ~3 µs for a Python loop); False when one may not
    be, or without the compiled code: the caller's own check then decides (and names
    the bad item). Never True for a list that check would refuse."""
    lib = _lib() if enabled or _lib.done else None
    return lib is not None and bool(lib.all_keys(keys))


def commit_fn() -> CommitFn | None:
    """The compiled batch commit (``kvbm_commit_run``), or None as ``load``."""
    lib = _lib() if enabled else None
    return None if lib is None else lib.commit


def unpin_fn() -> UnpinFn | None:
    """The compiled batch unpin (``kvbm_unpin_run``), or None as ``load``."""
    lib = _lib() if enabled else None
    return None if lib is None else lib.unpin


def unpin_run(reg: BlockRegistry, slots: list[int]) -> None:
    """``[reg.unpin(s) for s in slots]``: one compiled call where the registry keeps the
    core LRU in its records and dooms no block (a match's release: 512 pins ~0.4 ms in
    Python, cache-cold), else the loop; the same pins, evictable count and LRU order."""
    native = reg._native
    lib = _lib() if native is not None and reg._lru is not None and not reg._doomed else None
    fn = None if lib is None else lib.unpin
    if fn is not None and native is not None:
        at = fn(slots, native[1], native[2])
        reg._lru._n += reg._unlinked[0]  # type: ignore[union-attr]
        if at < 0:
            return
        slots = slots[at:]  # the loop asserts on slots[0]
    for s in slots:
        reg.unpin(s)

"""Native replay loops for the simulator: a whole trace in one C call.

Python's per-access overhead (a method call and a few dict operations per pin, touch,
insert, unpin and victim) held W-TinyLFU, the prefix-aware LRU, LIRS and the adaptive
policy under a million block accesses per CPU second, and ARC, LFU, S3-FIFO and the
priority order not far above. ``replay`` hands a trace to one of the loops here when
the policy is exactly one of those classes (the adaptive policy: with the candidates
lru and lirs), freshly built (nothing inserted yet), and the replay takes the common
path (no priorities, no key repeated in a request). Each loop is a call-for-call port
of the policy and of ``replay._replay_fast`` (``_native_src``), so hits, evictions and
every victim are the same, which ``tests/test_policies_native.py`` checks against the
Python path (the pinned victim digests, random traces). LRU and the learned policy
keep the Python loop (LRU is already at the loop's floor).

The policy object is left as it was built: the loop keeps its own state, in arrays
indexed by each key's rank among the trace's distinct keys (numpy's ``unique``, inside
the timed part). Keys must be ints that fit in 64 bits; any other trace takes the
Python loop. The C source is compiled once per process by ``kvbm._cc`` and loaded with
``ctypes.PyDLL`` (the GIL stays held: the adaptive loop keeps its pinned blocks in a
real CPython set, whose order a leader switch hands them over in). No compiler:
``available()`` is False and every replay takes the Python loop, with the same
results. ``enabled = False`` turns the loops off (tests run both paths).
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import numpy as np

from kvbm import _cc
from kvbm.policy import EvictionPolicy

from ._native_src import SOURCE
from .workloads import Trace

__all__ = ["available", "enabled", "replay", "replay_fifo", "supports"]

#: False turns the native loops off in this process (tests compare both paths).
enabled = True

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _build() -> ctypes.CDLL | None:
    # PyDLL: the GIL stays held (the adaptive loop calls CPython's set API).
    lib = _cc.build(SOURCE, "the policy simulator's replay loops", "the Python loop",
                    loader=ctypes.PyDLL)
    if lib is None:
        return None
    lib.kvbm_replay_wtinylfu.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _P, _P, _P, _P, _P]
    lib.kvbm_replay_prefix.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _P, _P]
    lib.kvbm_replay_lirs.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _I, _I, _P, _P]
    lib.kvbm_replay_adaptive.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _P, ctypes.c_double,
                                         _P, _P, _P, _P, _P, _P, _P]
    lib.kvbm_replay_arc.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _I, _P, _P]
    lib.kvbm_replay_s3fifo.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _I, _I, _I, _P, _P]
    lib.kvbm_replay_priority.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _P, _P]
    lib.kvbm_replay_lfu.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _P, _P]
    lib.kvbm_replay_fifo.argtypes = [_I, _I, _P, _P, _I, ctypes.c_int, _P, _P]
    for fn in (lib.kvbm_replay_wtinylfu, lib.kvbm_replay_prefix, lib.kvbm_replay_lirs,
               lib.kvbm_replay_adaptive, lib.kvbm_replay_arc, lib.kvbm_replay_s3fifo,
               lib.kvbm_replay_priority, lib.kvbm_replay_lfu, lib.kvbm_replay_fifo):
        fn.restype = ctypes.c_int
    return lib


#: The loaded loops (compiled at the first call), or None without a compiler.
_lib = _cc.Once(_build)


def available() -> bool:
    """Whether the native loops are built (a C compiler was found) and enabled."""
    return enabled and _lib() is not None


def _fresh(policy: EvictionPolicy) -> str | None:
    """The loop for ``policy``: its exact class, and only before its first call."""
    from .adaptive import AdaptivePolicy
    from .eviction import ARCPolicy, LFUPolicy, LIRSPolicy, PriorityLRUPolicy, S3FIFOPolicy
    from .prefix import PrefixLRUPolicy
    from .tinylfu import WTinyLFUPolicy

    t = type(policy)
    q: Any = policy
    if t is ARCPolicy:
        fresh = not (q._t1 or q._t2 or q._b1 or q._b2 or q._pinned) and q._p == 0
        return "arc" if fresh else None
    if t is S3FIFOPolicy:
        return "s3fifo" if not (q._freq or q._ghost or q._small or q._main) else None
    if t is LFUPolicy:
        return "lfu" if not (q._count or q._value or q._values) and q._age == 0 else None
    if t is PriorityLRUPolicy:
        return "priority" if not (q._prio or q._heap) else None
    if t is WTinyLFUPolicy:
        p: Any = policy
        return "wtinylfu" if not p._seg and p._hits == 0 and p._misses == 0 else None
    if t is PrefixLRUPolicy:
        return "prefix" if not policy._known and policy._clock == 0 else None  # type: ignore[attr-defined]
    if t is LIRSPolicy:
        return "lirs" if not policy._state else None  # type: ignore[attr-defined]
    if t is AdaptivePolicy:
        a: Any = policy
        fresh = (a._sampled == 0 and not a._recent and a.switches == 0 and not a._pinned
                 and len(a._leader) == 0 and all(not s.resident for s in a._shadows))
        ok = set(a.candidates) <= {"lru", "lirs"} and len(a.candidates) <= 8
        return "adaptive" if fresh and ok else None
    return None


def supports(policy: EvictionPolicy) -> bool:
    """Whether ``replay`` would run ``policy`` natively (loops built, class and state fit)."""
    return available() and _fresh(policy) is not None


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def _api() -> np.ndarray:
    """The CPython functions the adaptive loop calls, as addresses."""
    api = ctypes.pythonapi
    names = ("PySet_Add", "PySet_Discard", "PyObject_GetIter", "PyIter_Next", "PyLong_AsLongLong",
             "Py_DecRef")
    return np.array([ctypes.cast(getattr(api, n), ctypes.c_void_p).value for n in names], np.uint64)


def _lir_max(capacity: int) -> int:
    from .eviction import LIRSPolicy

    return int(LIRSPolicy(capacity)._lir_max)


def replay_fifo(trace: Trace, capacity: int, reverse: bool,
                victims: list[Any] | None = None) -> tuple[int, int] | None:
    """``replay`` with the least work a policy can do (``bench/policies.py``'s FIFO:
    first in, first out, hits ignored): the floor the bench sets the native loops
    beside. None without the loops."""
    return replay(trace, None, capacity, reverse, victims)


def replay(trace: Trace, policy: EvictionPolicy | None, capacity: int, reverse: bool,
           victims: list[Any] | None = None, stats: dict[str, Any] | None = None
           ) -> tuple[int, int] | None:
    """``(hits, evictions)`` of ``trace`` replayed natively, or None when the policy or
    the trace has no native path (the caller then runs the Python loop). With
    ``victims``, each victim call's answer is appended to it in order (a key, or None
    when every block was pinned); with ``stats``, the
    loop's end state that the policy would show is put in it (W-TinyLFU's
    ``window_max``, the adaptive policy's ``switches`` and ``leader``), for tests."""
    if not enabled:
        return None
    kind = "fifo" if policy is None else _fresh(policy)
    if kind is None:
        return None
    lib = _lib()
    if lib is None:
        return None
    reqs = trace.requests
    off = np.zeros(len(reqs) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, reqs), np.int64, len(reqs)), out=off[1:])
    total = int(off[-1])
    try:
        flat = np.fromiter(itertools.chain.from_iterable(reqs), np.int64, total)
    except (TypeError, ValueError, OverflowError):
        return None  # keys that are not 64-bit ints: the Python loop
    uniq, inv = np.unique(flat, return_inverse=True)
    ids = np.ascontiguousarray(inv.reshape(-1), dtype=np.int64)
    nkeys = len(uniq)
    out = np.zeros(8, np.int64)
    vout = np.empty(max(1, total), np.int64) if victims is not None else None
    vptr = _ptr(vout) if vout is not None else None
    common = (nkeys, len(reqs), _ptr(off), _ptr(ids), capacity, int(reverse))
    if kind == "wtinylfu":
        p: Any = policy
        mask = p._smask
        with np.errstate(over="ignore"):
            h = uniq.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(31)
        m = np.uint64(mask)
        pos = np.empty((4, nkeys), np.uint32)
        pos[0] = h & m
        pos[1] = (h >> np.uint64(16)) & m
        pos[2] = (h >> np.uint64(32)) & m
        pos[3] = ((h >> np.uint64(48)) ^ (h >> np.uint64(5))) & m
        params = np.array([p.capacity, p._window_max, p._protected_max, int(p.adaptive), p._sample,
                           p.sketch.sample, p.sketch.width], np.int64)
        dparams = np.array([p._protected_ratio, p._step, p._prev_rate], np.float64)
        rc = lib.kvbm_replay_wtinylfu(*common, _ptr(pos), _ptr(params), _ptr(dparams), _ptr(out), vptr)
        if stats is not None:
            stats["window_max"] = int(out[2])
    elif kind == "prefix":
        rc = lib.kvbm_replay_prefix(*common, _ptr(out), vptr)
    elif kind == "arc":
        arc: Any = policy
        rc = lib.kvbm_replay_arc(*common, arc.capacity, _ptr(out), vptr)
    elif kind == "s3fifo":
        q: Any = policy
        rc = lib.kvbm_replay_s3fifo(*common, q.capacity, q._small_target, q._promote, _ptr(out), vptr)
    elif kind == "priority":
        rc = lib.kvbm_replay_priority(*common, _ptr(out), vptr)
    elif kind == "lfu":
        rc = lib.kvbm_replay_lfu(*common, _ptr(out), vptr)
    elif kind == "fifo":
        rc = lib.kvbm_replay_fifo(*common, _ptr(out), vptr)
    elif kind == "adaptive":
        a: Any = policy
        kinds = [0 if n == "lru" else 1 for n in a.candidates]
        scap = a._shadows[0].capacity
        with np.errstate(over="ignore"):
            hs = uniq.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        sampled = ((hs >> np.uint64(40)) & np.uint64(a._mask)) == 0
        sid = np.where(sampled, np.cumsum(sampled) - 1, -1).astype(np.int64)
        nsampled = int(sampled.sum())
        params = np.array([a.capacity, _lir_max(a.capacity), len(kinds), a.period, scap,
                           _lir_max(scap), nsampled, *kinds], np.int64)
        objs = uniq.tolist()  # the keys as ints, for the pinned set
        obj_ptrs = np.fromiter(map(id, objs), np.uint64, nkeys)
        pinned: set[int] = set()
        api = _api()
        rc = lib.kvbm_replay_adaptive(*common, _ptr(params), float(a.margin), _ptr(sid), _ptr(uniq),
                                      _ptr(obj_ptrs), id(pinned), _ptr(api), _ptr(out), vptr)
        if stats is not None:
            stats["switches"], stats["leader"] = int(out[2]), a.candidates[int(out[3])]
        del objs
    else:
        lirs: Any = policy
        rc = lib.kvbm_replay_lirs(*common, lirs.capacity, lirs._lir_max, _ptr(out), vptr)
    if rc != 0:
        return None  # out of memory in the loop: the Python loop
    hits, evictions = int(out[0]), int(out[1])
    if victims is not None and vout is not None:
        got = vout[:int(out[7])]
        keys = uniq[np.maximum(got, 0)].tolist()
        victims.extend(None if v < 0 else k for v, k in zip(got.tolist(), keys))
    return hits, evictions

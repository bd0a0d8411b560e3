"""Where a worst-order 64-key match at 10M blocks spends its time over one at 10K.

One process holds two real managers (``bench/registry.py --entry manager``: one host tier,
the smallest model), with 10K and 10M blocks in the interleaved slot order, and runs the
benchmark's loop: a random cached prefix at 10M, the hot prefix at 10M, a random prefix
at 10K, each released after it. Every other round the two random matches go through a
copy of ``KvBlockManager.match_prefix`` and ``Planner.match`` written out step by step
with a clock read between steps, and the compiled lookup is a copy of
``kvbm._registry_native``'s source with a time-stamp counter read between its passes; the
other rounds time the real ``match_prefix`` (its p50 beside the steps' sum checks that
the copy is faithful). Medians per step, at 10K and at 10M, and the difference.

Run: ``flock /tmp/kvbm_bench.lock python bench/registry_account.py [--blocks 10000000]
[--samples 3000] [--no-hot]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry import PREFIX, REF, TINY_MODEL, _key  # noqa: E402

from kvbm import _cc, _registry_native  # noqa: E402
from kvbm.manager import KvBlockManager, _check_hashes  # noqa: E402
from kvbm.match import Match  # noqa: E402

# Marks in the compiled lookup: (text after which a time stamp is taken, name of the part
# that ends there). The first stamp is at the call's start.
_MARKS = (
    ("    const int32_t *index = (const int32_t *)(intptr_t)p[P_INDEX];\n", "C: checks, out list"),
    ("            /* 2: each bucket read;", "C: fast path + pass 1 (hash, bucket prefetch)"),
    ("            /* 3: in order, the probe", "C: pass 2 (buckets, record prefetch)"),
    ("            ended = found < m;", "C: pass 3 (probe, compare)"),
    ("        for (int i = 0; i < found; i++) {\n            PyObject *v", "C: pin"),
    ("        start += found;", "C: slot ints into the list"),
)


def _instrumented_lookup() -> tuple[Any, Any, Any]:
    src = _registry_native.SOURCE.replace(
        "#include <string.h>",
        "#include <string.h>\n#include <x86intrin.h>\nuint64_t kvbm_t[64];\nint kvbm_nt;\n"
        "uint64_t kvbm_tsc(void) { return __rdtsc(); }\n#define STAMP(i) (kvbm_t[kvbm_nt++ & 63] = "
        "(uint64_t)(i) << 56 | (__rdtsc() & ((1ull << 56) - 1)))\n", 1)
    src = src.replace("    *unlinked = 0;\n", "    *unlinked = 0;\n    kvbm_nt = 0;\n    STAMP(0);\n", 1)
    for i, (at, _) in enumerate(_MARKS, 1):
        assert at in src, at
        src = src.replace(at, f"STAMP({i});\n" + at if not at.startswith("    const") else at + f"STAMP({i});\n", 1)
    lib = _cc.build(src, "the instrumented lookup", "nothing",
                    flags=("-O2", f"-I{sysconfig.get_paths()['include']}"), loader=ctypes.PyDLL)
    if lib is None:
        sys.exit("needs a C compiler and this interpreter's headers")
    f = lib.kvbm_find_run
    f.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p]
    f.restype = ctypes.py_object
    tsc = lib.kvbm_tsc
    tsc.restype = ctypes.c_uint64
    return f, (ctypes.c_uint64 * 64).in_dll(lib, "kvbm_t"), ctypes.c_int.in_dll(lib, "kvbm_nt"), tsc


def _manager(n: int, fn: Any) -> KvBlockManager:
    mgr = KvBlockManager.from_config({"model": TINY_MODEL, "page_size": 1, "tiers": [
        {"type": "host", "num_blocks": n, "touch": False}]})
    reg = mgr.planner.tiers[0].registry
    assert reg._native is not None and reg._lru is not None, "needs the compiled lookup and LRU"
    reg._native = (fn, *reg._native[1:])
    for b in range(PREFIX):
        for p in range(n // PREFIX):
            reg.commit(reg.allocate(_key(p * PREFIX + b)))  # type: ignore[arg-type]
    return mgr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=10_000_000)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--no-hot", action="store_true", help="leave out the hot match between")
    a = ap.parse_args()
    fn, stamps, nstamps, tsc = _instrumented_lookup()
    c0, t0 = tsc(), time.perf_counter()
    time.sleep(0.05)
    ns_per_tick = (time.perf_counter() - t0) * 1e9 / (tsc() - c0)
    small = _manager(REF, fn)
    big = _manager(a.blocks - a.blocks % PREFIX, fn)
    gc.collect()
    pc = time.perf_counter_ns

    def steps(mgr: KvBlockManager, tokens: list[bytes]) -> tuple[Match, list[tuple[str, int]]]:
        t = [pc()]
        mgr._check_open()
        hashes = mgr._as_hashes(tokens)
        if not _registry_native.all_keys(hashes):  # as match_prefix since 210433e
            _check_hashes("match_prefix", hashes, fix="")
        t.append(pc())
        self = mgr.planner
        m = Match(self, self.page_size)
        t.append(pc())
        self.lock.acquire()
        self._enter()
        t.append(pc())
        ts = self.tiers[0]
        reg = ts.registry
        f, params, unl = reg._native  # type: ignore[misc]
        slots = f(hashes, params, unl)
        t.append(pc())
        if slots:
            reg._lru._n -= reg._unlinked[0]  # type: ignore[union-attr]
            reg._guess = slots[-1] + 1
        t.append(pc())
        k = len(slots)
        ts.lookups += k
        ts.hits += k
        m.hashes.extend(hashes[:k])
        m.tiers.extend([ts.name] * k)
        m._pins.extend([(ts.index, s) for s in slots])
        t.append(pc())
        events = self._take_events()
        self.lock.release()
        if self.events is not None and self.events.active and m.hashes:
            events.extend(self._matched_events(m))
        self._publish(events)
        t.append(pc())
        rest = hashes[m.num_blocks:]
        assert not rest
        t.append(pc())
        names = ("manager: checks, hashes list", "Match()", "lock, _enter", "compiled lookup (whole)",
                 "registry after the call", "planner: per-tier counts, Match lists, pins",
                 "events, unlock, publish", "manager: rest")
        out = [(nm, t[i + 1] - t[i]) for i, nm in enumerate(names)]
        marks = [int(stamps[i]) for i in range(min(int(nstamps.value), 64))]
        for prev, cur in zip(marks, marks[1:]):
            part = _MARKS[(cur >> 56) - 1][1]
            out.append((part, round(((cur & (2**56 - 1)) - (prev & (2**56 - 1))) * ns_per_tick)))
        return m, out

    rng = random.Random(0)
    hot = [_key(i) for i in range(PREFIX)]
    acc: dict[str, dict[str, list[int]]] = {"10K": {}, "big": {}}
    plain: dict[str, list[int]] = {"10K": [], "big": []}
    for it in range(a.samples):
        for name, mgr, n in (("big", big, a.blocks), ("10K", small, REF)):
            if name == "10K" and not a.no_hot:
                big.match_prefix(hot).release()
            p = rng.randrange(n // PREFIX)
            keys = [_key(i) for i in range(p * PREFIX, (p + 1) * PREFIX)]
            if it % 2:
                m, parts = steps(mgr, keys)
                row: dict[str, int] = {}
                for part, v in parts:  # a part of the C call met in several chunks: summed
                    row[part] = row.get(part, 0) + v
                for part, v in row.items():
                    acc[name].setdefault(part, []).append(v)
            else:
                t0 = pc()
                m = mgr.match_prefix(keys)
                plain[name].append(pc() - t0)
            assert m.num_blocks == PREFIX
            m.release()
    med = statistics.median
    print(f"a 64-key match_prefix, interleaved slot order, 10K vs {a.blocks:,} blocks; "
          f"{a.samples // 2} samples each, median ns; hot match between: {not a.no_hot}; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  {'step':48s} {'10K':>7s} {f'{a.blocks / 1e6:g}M':>7s} {'extra':>7s}")
    for part in acc["big"]:
        x, y = med(acc["10K"].get(part, [0])), med(acc["big"][part])
        print(f"  {part:48s} {x:7.0f} {y:7.0f} {y - x:7.0f}")
    top = [p for p in acc["big"] if not p.startswith("C:")]
    x = med([sum(v) for v in zip(*(acc["10K"][p] for p in top))])
    y = med([sum(v) for v in zip(*(acc["big"][p] for p in top))])
    print(f"  {'sum of the steps (C parts inside the lookup)':48s} {x:7.0f} {y:7.0f} {y - x:7.0f}"
          f"  ratio {y / x:.2f}")
    x, y = med(plain["10K"]), med(plain["big"])
    print(f"  {'match_prefix itself, other rounds':48s} {x:7.0f} {y:7.0f} {y - x:7.0f}  ratio {y / x:.2f}")
    small.close()
    big.close()


if __name__ == "__main__":
    main()

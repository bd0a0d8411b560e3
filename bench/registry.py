"""The block registry at 10K, 1M and 10M cached blocks: bytes per block and match time.

For each size and implementation a fresh process fills one tier's registry (with the
core's LRU policy) to capacity with 64-block prefixes of xxh3-128 keys, then times
``Planner.match`` (the metadata half of ``match_prefix``: lookup, pin, LRU update)
of a 64-block prefix, released after each match:

- ``cold``: a different random cached prefix each time (what a server sees; the
  registry's memory is out of cache at 10M blocks),
- ``hot``: one prefix over and over, the same code with every line in cache: the
  limit the cold figure is measured against (``cold/hot``).

Bytes per block is the growth of the process's resident memory from before the
registry was made to after it was full, over the number of blocks; everything the
registry and its policy hold counts, the keys included. Beside it, its limit: the
16 bytes of the key itself. ``traced`` is the same from ``tracemalloc`` (plus the
keys' anonymous mapping, which it does not see), in a run of its own (up to 1M blocks,
where tracing is cheap enough). ``old`` is the registry before issue 14
(``bench/registry_old.py``: a dict, per-slot lists and an ordered dict); ``py`` is
``new`` without its compiled lookup of a run (``kvbm._registry_native``), as on a
machine with no C compiler: its numpy and Python paths.

Two slot orders (``--fill``): ``request``, each prefix's blocks saved together into
consecutive slots (how a tier fills: a request's blocks come off the free stack in a
row), and ``interleaved``, block b of every prefix and then block b + 1, so that no
two blocks of a prefix are near (as in a random placement: every lookup of a match a
random access to each array): the worst case for ``pin_run``, which reads a run saved
together from consecutive slots and looks the rest up through the index.

What is timed (``--entry``): ``manager`` (the default), ``KvBlockManager.match_prefix`` of a
real manager whose one host tier holds the registry (the smallest model: 4 bytes a block,
its arena never touched), which is what a user calls (its checks of the hashes, then
``Planner.match``); the registry is filled through its own calls (the blocks' bytes are
not the subject), and B/block is then the registry's arrays (``nbytes``: at 1M and 10M
blocks within 0.3 % of its RSS growth; at 10K above it, pages never touched), since the
manager's own memory also grows with the tier; ``planner``, ``Planner.match`` alone,
B/block from the RSS. ``old`` has no manager: always ``planner``.

Each process also holds the same registry at 10K blocks (``REF``, filled in the same
order) and matches a random prefix of it after each cold match: ``÷ 10K paired`` is
the cold p50 over that one, both measured in one loop under the same load (on a
shared machine, processes run a minute apart meet different loads; the unpaired
``p50 ÷ p50@10000`` divides figures of two such processes).

``--floor`` measures instead what the worst order's ratio could be on this machine: C
loops of 64 random reads (one line a key; today's index-then-record layout; one
dependent read after another) in tables of a 10K and a 10M registry's size, the 10M
extra added to the fixed cost of a 10K match measured in the same run; each also
``cold``, after other work touched 16,384 random 4 KiB pages before each round (as the
benchmark's loop and any server run between two lookups: TLB and caches displaced),
and the cold rows again with the tables on 4 KiB pages (``4KiB``: what huge pages save).
``--py-check``: the manager checks the hashes in Python, as before ``210433e`` (an A/B).
The table's ``− 10K paired`` is the extra itself (10M p50 minus the paired 10K p50, µs).

Run: ``python bench/registry.py [--sizes 10000,1000000,10000000] [--impl old,new,py]
[--fill request,interleaved] [--entry manager|planner] [--runs 3] [--samples 2000] [--json] [--floor]``. Runs interleave the implementations and
sizes; the table gives min/median/max over runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import xxhash

PREFIX = 64  # blocks per prefix, matched at once
# --floor's cold rows: 4 KiB pages (one line each) touched between two rounds, about what
# the benchmark's loop does between two 10M matches (~100 us of Python: a 10K match and
# its release, a hot match, the keys), which leaves the lookup's page walks to memory
COLD = 16384
REF = 10_000  # the small registry each size is also compared with in its own process
CHUNK = 1 << 16
# --entry manager: the smallest model, so that a host tier of 10M blocks costs 40 MB
TINY_MODEL = {"name": "bench", "num_layers": 1, "num_kv_heads": 1, "head_dim": 1,
              "dtype": "float16"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(i.to_bytes(8, "little"))


def _child(impl: str, n: int, samples: int, seed: int, traced: bool, fill: str,
           entry: str = "planner", py_check: bool = False) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if py_check:  # --py-check: the manager's Python check of the hashes (before 210433e)
        from kvbm import _registry_native as rn
        rn.all_keys = lambda keys: False
    from kvbm.chain import TierState
    from kvbm.config import TierConfig
    from kvbm.manager import KvBlockManager
    from kvbm.planner import Planner
    from kvbm.policy import AdmitAll, LRUPolicy
    from kvbm.registry import BlockRegistry

    managers: dict[int, Any] = {}  # --entry manager: each registry's manager
    if entry == "manager":  # the plugins and their imports loaded before rss0
        KvBlockManager.from_config({"model": TINY_MODEL, "page_size": 1, "tiers": [
            {"type": "host", "num_blocks": 64}]}).close()

    class _Tier:  # what the planner asks of a tier's class on the match path
        shared = False
        medium = "host"

    if impl == "py":  # the new registry without its compiled lookup (the numpy/Python paths)
        from kvbm import _registry_native
        _registry_native.enabled = False

    def make(n: int) -> Any:
        if impl == "old":
            from registry_old import OldBlockRegistry, OldLRUPolicy

            def pin_run(self: Any, keys: Any) -> list[int]:  # the planner's loop before
                out: list[int] = []
                for k in keys:
                    slot = self.pin(k)
                    if slot is None:
                        break
                    out.append(slot)
                return out

            OldBlockRegistry.pin_run = pin_run
            return OldBlockRegistry("bench", n, OldLRUPolicy(n))
        if entry == "manager":  # the registry of a real manager's one host tier
            mgr = KvBlockManager.from_config({"model": TINY_MODEL, "page_size": 1, "tiers": [
                {"type": "host", "num_blocks": n, "touch": False}]})
            managers[id(mgr.planner.tiers[0].registry)] = mgr
            return mgr.planner.tiers[0].registry
        return BlockRegistry("bench", n, LRUPolicy(n))

    def fill_up(reg: Any, n: int) -> None:
        allocate, commit = reg.allocate, reg.commit
        prefixes = n // PREFIX
        if fill == "request":  # each prefix saved at once: its blocks in consecutive slots
            order: Any = range(n)
        else:  # block b of every prefix, then block b + 1: a prefix's blocks far apart
            order = (p * PREFIX + b for b in range(PREFIX) for p in range(prefixes))
        batch: list[int] = []
        for i in order:
            batch.append(i)
            if len(batch) == CHUNK:
                for k in [_key(j) for j in batch]:
                    commit(allocate(k))
                batch = []
        for k in [_key(j) for j in batch]:
            commit(allocate(k))

    n -= n % PREFIX
    prefixes = n // PREFIX
    if not traced:
        # The same registry at REF blocks, matched in the same loop: the ratio to it
        # is paired, sample for sample, under the same load (made before rss0: its
        # bytes do not count).
        ref = make(REF)
        fill_up(ref, REF)
    gc.collect()
    if traced:  # a run of its own: tracing's own memory would count in the RSS
        tracemalloc.start()
    rss0 = _rss()
    reg = make(n)
    t0 = time.perf_counter()
    fill_up(reg, n)
    fill_s = time.perf_counter() - t0
    gc.collect()
    rss1 = _rss()
    if managers:  # the manager's own memory grows with the tier too: count the registry's
        rss1 = rss0 + reg.nbytes  # arrays (at 1M+ within 0.3 % of its RSS growth)
    assert reg.num_used == n and reg.num_evictable == n
    if traced:
        # tracemalloc sees numpy's arrays but not the keys' anonymous mapping: add it.
        mapped = len(reg._keys.probe[4]) if impl == "new" else 0
        return {"impl": impl, "blocks": n,
                "traced_bytes_per_block": (tracemalloc.get_traced_memory()[0] + mapped) / n}

    def planner_of(reg: Any, n: int) -> Planner:
        ts = TierState("bench", 0, _Tier, TierConfig(type="host", num_blocks=n), reg,  # type: ignore[arg-type]
                       AdmitAll())
        return Planner([ts], page_size=16)

    # What the timed loop calls: the manager's match_prefix (what a user calls: its checks
    # of the hashes, then Planner.match), or Planner.match alone (--entry planner; old).
    if entry == "manager":
        match, ref_match = (managers[id(reg)].match_prefix, managers[id(ref)].match_prefix)
    else:
        match, ref_match = planner_of(reg, n).match, planner_of(ref, REF).match
    rng = random.Random(seed)
    hot = [_key(i) for i in range(0, PREFIX)]
    cold_t: list[float] = []
    hot_t: list[float] = []
    ref_t: list[float] = []
    perf = time.perf_counter
    for _ in range(samples):
        p = rng.randrange(prefixes)
        keys = [_key(i) for i in range(p * PREFIX, (p + 1) * PREFIX)]
        t0 = perf()
        m = match(keys)
        t1 = perf()
        m.release()
        assert m.num_blocks == PREFIX
        cold_t.append(t1 - t0)
        t0 = perf()
        m = match(hot)
        t1 = perf()
        m.release()
        hot_t.append(t1 - t0)
        p = rng.randrange(REF // PREFIX)
        keys = [_key(i) for i in range(p * PREFIX, (p + 1) * PREFIX)]
        t0 = perf()
        m = ref_match(keys)
        t1 = perf()
        m.release()
        assert m.num_blocks == PREFIX
        ref_t.append(t1 - t0)
    cold_t.sort()
    hot_t.sort()
    ref_t.sort()
    for mgr in managers.values():
        mgr.close()
    return {
        "impl": impl, "blocks": n, "fill": fill, "entry": entry,
        "rss_bytes_per_block": (rss1 - rss0) / n,
        "array_bytes_per_block": getattr(reg, "nbytes", 0) / n or None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fill_blocks_per_s": n / fill_s,
        "match_p50_us": cold_t[len(cold_t) // 2] * 1e6,
        "match_p99_us": cold_t[int(len(cold_t) * 0.99)] * 1e6,
        "hot_p50_us": hot_t[len(hot_t) // 2] * 1e6,
        "ref_p50_us": ref_t[len(ref_t) // 2] * 1e6,
    }


def _mmm(xs: list[float]) -> str:
    return f"{min(xs):.3g}/{statistics.median(xs):.3g}/{max(xs):.3g}"


# -- the physical floor of the ratio (--floor) ----------------------------------------------
# What random memory reads alone cost on this machine, without Python: 64 lookups of
# random stored keys (the keys of one prefix in the worst order) in a table of a 10K and
# of a 10M registry's size. Modes: 0, one random cache line per key, all prefetched (a
# layout where the probe, compare and pin need one line); 1, today's layout
# (``kvbm.flatmap``/``kvbm._registry_native``: an int32 index of 4-entry buckets with
# tags over 2n entries, then a 32-byte record per slot; the same passes: buckets, tagged
# records, then probe, compare and pin); 2, one dependent read after another (64 lines,
# each naming the next: a memory latency each, nothing overlapped).
FLOOR_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}
static uint64_t rs;
static uint64_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static uint64_t mix(uint64_t x) { x ^= x >> 31; x *= 0x9E3779B97F4A7C15ull; x ^= x >> 29; return x; }
static int cmpu(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}
/* Anonymous memory on 2 MiB pages where the kernel allows, as the registry's arrays
 * (on 4 KiB pages with `small`: modes 10 and 11, what huge pages save). */
static int small;
static void *big(size_t n) {
    void *p = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    madvise(p, n, small ? MADV_NOHUGEPAGE : MADV_HUGEPAGE);
    memset(p, 0, n);
    return p;
}
#define K 64
typedef struct { uint64_t k0, k1; int32_t pins; int8_t state, pad[3]; int32_t prev, next; } rec_t;

/* Before each round with `cold` > 0: one line in each of `cold` random 4 KiB pages of a
 * 256 MiB buffer on 4 KiB pages (as the interpreter's heap), read and written outside the
 * timed part, as a server's other work between two matches leaves the caches and TLB. */
static char *junk;
static void thrash(int cold) {
    if (cold <= 0)
        return;
    if (junk == NULL) {
        void *p = mmap(0, (size_t)1 << 28, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return;
        madvise(p, (size_t)1 << 28, MADV_NOHUGEPAGE);
        memset(p, 1, (size_t)1 << 28);
        junk = p;
    }
    for (int i = 0; i < cold; i++)
        junk[(rnd() % (1u << 16)) << 12] += 1;
}

/* The median ns of `iters` rounds of 64 lookups (mode above) in a table for n blocks;
 * -1 when the memory cannot be had. */
double kvbm_floor(int mode, int64_t n, int iters, uint64_t seed, int cold) {
    rs = seed | 1;
    small = mode >= 10;
    mode %= 10;
    uint64_t *t = malloc(sizeof(uint64_t) * (size_t)iters);
    uint64_t *qa = malloc(sizeof(uint64_t) * 2 * K * (size_t)iters);  /* the keys asked, in order */
    volatile uint64_t sink = 0;
    double r = -1;
    if (t == NULL || qa == NULL)
        goto out;
    if (mode == 0 || mode == 2) {
        size_t lines = (size_t)n * 48 / 64;  /* about a registry's bytes a block */
        uint64_t *b = big(lines * 64);
        if (b == NULL)
            goto out;
        for (size_t i = 0; i < lines; i++)
            b[i * 8] = rnd() % lines;  /* each line names another (mode 2's chain) */
        for (size_t i = 0; i < (size_t)K * iters; i++)
            qa[i] = rnd() % lines;
        for (int it = 0; it < iters; it++) {
            const uint64_t *q = qa + (size_t)it * K;
            thrash(cold);
            uint64_t s = 0, t0 = now_ns();
            if (mode == 0) {
                for (int i = 0; i < K; i++)
                    __builtin_prefetch(b + q[i] * 8, 0, 3);
                for (int i = 0; i < K; i++)
                    s += b[q[i] * 8];
            } else {
                uint64_t j = q[0];
                for (int i = 0; i < K; i++)
                    j = b[j * 8];
                s = j;
            }
            t[it] = now_ns() - t0;
            sink += s;
        }
        munmap(b, lines * 64);
    } else {
        int bits = 3, tag_shift = 1;
        while ((1ll << bits) < 2 * n) bits++;
        while ((1ll << tag_shift) < n) tag_shift++;
        uint64_t size = 1ull << bits, mask = size - 1, home_mask = mask & ~3ull;
        int32_t slot_mask = (1 << tag_shift) - 1;
        uint64_t tag_mask = (1ull << (31 - tag_shift)) - 1;
        int32_t *index = big(size * 4);
        rec_t *recs = big((size_t)n * sizeof(rec_t));
        if (index == NULL || recs == NULL)
            goto out;
        memset(index, 0xff, size * 4);
        for (int64_t s = 0; s < n; s++) {
            recs[s].k0 = rnd();
            recs[s].k1 = rnd();
            recs[s].state = 2;
            uint64_t h = mix(recs[s].k0 ^ recs[s].k1), i = h & home_mask;
            while (index[i] >= 0)
                i = (i + 1) & mask;
            index[i] = (int32_t)(s | (int64_t)((h >> bits) & tag_mask) << tag_shift);
        }
        for (size_t i = 0; i < (size_t)K * iters; i++) {
            int64_t s = (int64_t)(rnd() % (uint64_t)n);
            qa[2 * i] = recs[s].k0;
            qa[2 * i + 1] = recs[s].k1;
        }
        for (int it = 0; it < iters; it++) {
            const uint64_t *q = qa + (size_t)it * 2 * K;
            uint64_t home[K];
            int32_t tag[K], slot[K];
            int found = 0;
            thrash(cold);
            uint64_t t0 = now_ns();
            for (int i = 0; i < K; i++) {
                uint64_t h = mix(q[2 * i] ^ q[2 * i + 1]);
                home[i] = h & home_mask;
                tag[i] = (int32_t)((h >> bits) & tag_mask);
                __builtin_prefetch(index + home[i], 0, 3);
            }
            for (int i = 0; i < K; i++)
                for (int j = 0; j < 4; j++) {
                    int32_t e = index[home[i] + j];
                    if (e < 0)
                        break;
                    if ((e >> tag_shift) == tag[i])
                        __builtin_prefetch(recs + (e & slot_mask), 1, 3);
                }
            for (; found < K; found++) {
                uint64_t i = home[found];
                int32_t e, s = -1;
                while ((e = index[i]) >= 0) {
                    if ((e >> tag_shift) == tag[found]) {
                        rec_t *c = recs + (e & slot_mask);
                        if (c->k0 == q[2 * found] && c->k1 == q[2 * found + 1]) {
                            s = e & slot_mask;
                            break;
                        }
                    }
                    i = (i + 1) & mask;
                }
                if (s < 0 || recs[s].state != 2)
                    break;
                slot[found] = s;
            }
            for (int i = 0; i < found; i++)
                recs[slot[i]].pins++;
            t[it] = now_ns() - t0;
            for (int i = 0; i < found; i++)
                recs[slot[i]].pins--;
            sink += (uint64_t)found;
        }
        munmap(index, size * 4);
        munmap(recs, (size_t)n * sizeof(rec_t));
    }
    qsort(t, (size_t)iters, sizeof(uint64_t), cmpu);
    r = (double)t[iters / 2];
out:
    free(t);
    free(qa);
    (void)sink;
    return r;
}
"""


def _floor(runs: int, samples: int, entry: str) -> None:
    """The physical floor of ``÷ 10K paired`` in the worst order on this machine: what
    64 random reads cost at a 10M registry's size over a 10K one's (C, no Python), added
    to the fixed cost of a 10K match (``--entry``'s call, p50, measured in the same run)."""
    import ctypes

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kvbm import _cc
    from kvbm.chain import TierState
    from kvbm.config import TierConfig
    from kvbm.manager import KvBlockManager
    from kvbm.planner import Planner
    from kvbm.policy import AdmitAll, LRUPolicy
    from kvbm.registry import BlockRegistry

    lib = _cc.build(FLOOR_SOURCE, "the floor benchmark", "nothing")
    if lib is None:
        sys.exit("--floor needs a C compiler (cc or gcc, or $CC)")
    f = lib.kvbm_floor
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_int]
    f.restype = ctypes.c_double

    class _Tier:
        shared = False
        medium = "host"

    mgr = None
    if entry == "manager":
        mgr = KvBlockManager.from_config({"model": TINY_MODEL, "page_size": 1, "tiers": [
            {"type": "host", "num_blocks": REF, "touch": False}]})
        ref = mgr.planner.tiers[0].registry
        match = mgr.match_prefix
    else:
        ref = BlockRegistry("bench", REF, LRUPolicy(REF))
        match = Planner([TierState("bench", 0, _Tier, TierConfig(type="host", num_blocks=REF),  # type: ignore[arg-type]
                                   ref, AdmitAll())], page_size=16).match
    prefixes = REF // PREFIX
    for i in (p * PREFIX + b for b in range(PREFIX) for p in range(prefixes)):
        ref.commit(ref.allocate(_key(i)))  # type: ignore[arg-type]
    big = 10_000_000
    rows: dict[str, list[float]] = {}
    rng = random.Random(0)
    for run in range(runs):
        ts = []
        for _ in range(samples):
            p = rng.randrange(prefixes)
            keys = [_key(i) for i in range(p * PREFIX, (p + 1) * PREFIX)]
            t0 = time.perf_counter()
            m = match(keys)
            t1 = time.perf_counter()
            m.release()
            ts.append(t1 - t0)
        ts.sort()
        rows.setdefault("fixed", []).append(ts[len(ts) // 2] * 1e6)
        for mode, name in ((0, "one line"), (1, "today's layout"), (2, "dependent"),
                           (10, "one line 4KiB"), (11, "today's 4KiB")):
            for n, size in ((REF, "10K"), (big, "10M")):
                if mode == 2 and n == REF:
                    continue
                if mode < 10:
                    rows.setdefault(f"{name} {size}", []).append(
                        f(mode, n, 20000, run + 1, 0) / 1e3)
                if mode != 2:  # the same after other work (COLD pages touched) each round
                    rows.setdefault(f"{name} cold {size}", []).append(
                        f(mode, n, 4000, run + 1, COLD) / 1e3)
        print(f"  run {run}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items())
              + f" us, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    fixed = rows["fixed"]
    print(f"the floor of the worst order's ratio (64-key match, 10M ÷ 10K blocks); "
          f"min/median/max of {runs} runs; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if mgr is not None:
        mgr.close()
    what = "KvBlockManager.match_prefix" if mgr is not None else "Planner.match"
    print(f"  fixed cost: {what} p50 of a 10K registry (interleaved) {_mmm(fixed)} us; "
          f"cold: {COLD} random 4 KiB pages touched before each round")
    for name in ("one line", "today's layout", "one line cold", "today's layout cold",
                 "one line 4KiB cold", "today's 4KiB cold"):
        small, large = rows[f"{name} 10K"], rows[f"{name} 10M"]
        extra = [b - s for s, b in zip(small, large)]
        floor = [(x + e) / x for x, e in zip(fixed, extra)]
        print(f"  {name:20s}: 64 lookups 10K {_mmm(small)} us, 10M {_mmm(large)} us, "
              f"10M extra {_mmm(extra)} us -> floor ratio (fixed + extra) / fixed {_mmm(floor)}")
    dep = rows["dependent 10M"]
    two = [b - s for s, b in zip(rows["today's layout 10K"], rows["today's layout 10M"])]
    print(f"  one dependent random line at 10M: {_mmm([d / PREFIX * 1e3 for d in dep])} ns; "
          f"today's two lines a key as if each waited for the last: {_mmm([d * 2 for d in dep])} us, "
          f"of which the passes still pay (10M extra ÷ that) {_mmm([e / (2 * d) for e, d in zip(two, dep)])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,1000000,10000000")
    ap.add_argument("--impl", default="old,new",
                    help="comma-separated: old, new, py (new without its compiled lookup)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2000, help="matches timed per size")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true",
                    help="measure the physical floor of the worst order's ratio instead "
                         "(C loops of random reads at 10K and 10M blocks' sizes, beside "
                         "the fixed cost of a 10K match)")
    ap.add_argument("--entry", default="manager", choices=("manager", "planner"),
                    help="what is timed: KvBlockManager.match_prefix (what a user calls) or "
                         "Planner.match alone (always for old, which has no manager)")
    ap.add_argument("--fill", default="request,interleaved",
                    help="slot order of each prefix's blocks: request (saved together), "
                         "interleaved (every prefix's block b, then b + 1: the worst case)")
    ap.add_argument("--py-check", action="store_true",
                    help="the manager checks a match's hashes in Python (as before 210433e), "
                         "not in one compiled pass: an A/B of that change")
    a = ap.parse_args()
    if a.floor:
        _floor(a.runs, a.samples, a.entry)
        return
    if a.child:
        print(json.dumps(_child(a.child[0], int(a.child[1]), a.samples, a.seed,
                                a.traced, a.fill, "planner" if a.child[0] == "old" else a.entry,
                                a.py_check)))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    impls = a.impl.split(",")
    rows: list[dict[str, Any]] = []
    traced: dict[tuple[str, int], float] = {}
    for n in (n for n in sizes if n <= 1_000_000):
        for impl in impls:
            out = subprocess.run([sys.executable, __file__, "--child", impl, str(n), "--traced",
                                  "--fill", "request", "--entry", "planner"],  # the registry alone
                                 check=True, capture_output=True, text=True).stdout
            traced[(impl, n)] = json.loads(out.strip().splitlines()[-1])["traced_bytes_per_block"]
    fills = a.fill.split(",")
    for run in range(a.runs):
        for fill in fills:
            for n in sizes:
                # Alternate which implementation goes first, so that neither always
                # meets the same load.
                for impl in (impls if run % 2 == 0 else impls[::-1]):
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", impl, str(n), "--samples",
                         str(a.samples), "--seed", str(run), "--fill", fill, "--entry", a.entry,
                         *(["--py-check"] if a.py_check else [])],
                        check=True, capture_output=True, text=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    r["run"] = run
                    rows.append(r)
                    if not a.json:
                        print(f"  run {run} {impl:3s} {fill:11s} {n:>10,d}: "
                              f"{r['rss_bytes_per_block']:6.1f} B/block, match p50 "
                              f"{r['match_p50_us']:7.1f} us (hot {r['hot_p50_us']:6.1f}, "
                              f"10K {r['ref_p50_us']:6.1f}), p99 "
                              f"{r['match_p99_us']:7.1f} us, peak {r['peak_rss_mib']:7.0f} MiB, "
                              f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    if a.json:
        print(json.dumps({"rows": rows, "traced": [
            {"impl": i, "blocks": n, "traced_bytes_per_block": v} for (i, n), v in traced.items()],
            "loadavg": load}, indent=2))
        return
    what = "KvBlockManager.match_prefix; old: Planner.match" if a.entry == "manager" else "Planner.match"
    print(f"block registry + LRU, {PREFIX}-block prefix matches ({what}); min/median/max "
          f"of {a.runs} runs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'impl':4s} {'fill':11s} {'blocks':>10s} | {'B/block (' + ('arrays' if a.entry == 'manager' else 'rss') + ')':>16s} {'÷ 16 B key':>14s} "
          f"{'traced':>7s} | {'match p50 us':>16s} {'p99 us':>18s} {'cold/hot':>14s} "
          f"{'p50 ÷ p50@' + str(sizes[0]):>16s} {'÷ 10K paired':>14s} {'− 10K paired us':>16s} | "
          f"{'peak MiB':>8s}")
    for impl in impls:
        for fill in fills:
            def of(n: int, impl: str = impl, fill: str = fill) -> list[dict[str, Any]]:
                return sorted((r for r in rows if r["impl"] == impl and r["fill"] == fill
                               and r["blocks"] == n - n % PREFIX), key=lambda r: r["run"])
            base = {r["run"]: r["match_p50_us"] for r in of(sizes[0])}
            for n in sizes:
                rs = of(n)
                if not rs:
                    continue
                b = [r["rss_bytes_per_block"] for r in rs]
                tr = traced.get((impl, n)) if fill == "request" else None
                ratio = [r["match_p50_us"] / base[r["run"]] for r in rs if r["run"] in base]
                print(f"{impl:4s} {fill:11s} {n:>10,d} | {_mmm(b):>16s} "
                      f"{_mmm([x / 16 for x in b]):>14s} {(f'{tr:.1f}' if tr else '-'):>7s} | "
                      f"{_mmm([r['match_p50_us'] for r in rs]):>16s} "
                      f"{_mmm([r['match_p99_us'] for r in rs]):>18s} "
                      f"{_mmm([r['match_p50_us'] / r['hot_p50_us'] for r in rs]):>14s} "
                      f"{(_mmm(ratio) if ratio else '-'):>16s} "
                      f"{_mmm([r['match_p50_us'] / r['ref_p50_us'] for r in rs]):>14s} "
                      f"{_mmm([r['match_p50_us'] - r['ref_p50_us'] for r in rs]):>16s} | "
                      f"{max(r['peak_rss_mib'] for r in rs):8.0f}")


if __name__ == "__main__":
    main()

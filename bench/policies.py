"""Eviction and admission policies over every workload family and the public Mooncake trace.

Five measurements, each printed as the Markdown table ``docs/benchmarks/policies.md``
carries:

1. One tier at a quarter of each trace's working set: every installed eviction policy's
   hit rate as a share of Belady's OPT (the ceiling) and its difference to LRU in
   points. Each family's parameters are printed beside it.
2. Speed: block accesses replayed per CPU second, min/median/max of ``--repeats``
   interleaved runs, through the fast engine (the registry's calls in a tight loop; in
   C for the policies ``kvbm_policies.native`` ports, each also shown through the
   Python loop), beside a FIFO policy (the least work a policy can do: the limit, as a
   ratio) and LRU through the real ``BlockRegistry``, with the load average before and
   after.
3. A chain, host at 1/16 and disk at 1/4 of the working set, write-through: prefix hit
   rate, each tier's share, blocks written to disk, for the eviction policies and disk
   admission filters named in ``CHAIN_RUNS``.
4. Host, disk and a bucket (1/16, 1/4, 1): a disk filter with the cascade stopping at
   a refusal or passing the block on to the bucket (``CASCADE_RUNS``).
5. Mooncake: LRU told which blocks come back, by an oracle or by a per-class estimate
   learned online: what reaching 0.8 of OPT there would take.

    .venv/bin/python bench/policies.py [--repeats 3] [--json]
                                       [--only single,speed,chain,cascade,bound]
                                       [--expanded]   # Mooncake at 16-token pages too (3.9 M accesses)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.plugins import build_plugins
from kvbm.policy import EvictionPolicy, LRUPolicy
from kvbm_policies import native
from kvbm_policies.chain import ChainTier, parse_named, simulate_chain
from kvbm_policies.families import FAMILIES, make_workload
from kvbm_policies.replay import belady, replay
from kvbm_policies.workloads import Trace, find_mooncake, load_mooncake

#: (label, host eviction, disk eviction, disk admission). Today's default chain is
#: lru / lru / frequency (Dynamo's filter is the disk tier's default admission).
#: ``reuse`` without a window gets twice the disk's blocks (the chain passes the tier's
#: size to a filter that declares ``capacity``).
CHAIN_RUNS: list[tuple[str, str, str, str]] = [
    ("lru, lru, all", "lru", "lru", "all"),
    ("lru, lru, frequency (default)", "lru", "lru", "frequency"),
    ("lru, lru, tinylfu", "lru", "lru", "tinylfu"),
    ("lru, lru, reuse (2x)", "lru", "lru", "reuse"),
    ("lru, lru, reuse 1x", "lru", "lru", "reuse:window=1x"),
    ("lru, adaptive, all", "lru", "adaptive", "all"),
    ("lru, adaptive, frequency", "lru", "adaptive", "frequency"),
    ("lru, adaptive, reuse (2x)", "lru", "adaptive", "reuse"),
    ("adaptive, adaptive, all", "adaptive", "adaptive", "all"),
    ("adaptive, adaptive, reuse (2x)", "adaptive", "adaptive", "reuse"),
]

#: Host 1/16, disk 1/4, a bucket as large as the working set, LRU everywhere: the disk's
#: filter, and whether a block it refuses goes on to the bucket (``bypass``, the
#: planner's default) or stops (``stop``, the cascade before it).
CASCADE_RUNS: list[tuple[str, str, bool]] = [
    ("all", "all", True),
    ("frequency, stop", "frequency", False),
    ("frequency, bypass", "frequency", True),
    ("reuse (2x), stop", "reuse", False),
    ("reuse (2x), bypass", "reuse", True),
]


#: The row of the C loop's floor in the speed table.
NATIVE_FLOOR = "fifo (C floor)"


class FIFOPolicy(EvictionPolicy):
    """First in, first out, ignoring hits: the speed limit of a policy in the replay."""

    def __init__(self, capacity: int, **options: Any) -> None:
        super().__init__(capacity)
        self._q: OrderedDict[SequenceHash, None] = OrderedDict()

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        self._q[key] = None

    def touch(self, key: SequenceHash) -> None:
        pass

    def pin(self, key: SequenceHash) -> None:
        self._q.pop(key, None)

    def unpin(self, key: SequenceHash) -> None:
        self._q[key] = None

    def remove(self, key: SequenceHash) -> None:
        self._q.pop(key, None)

    def victim(self) -> SequenceHash | None:
        return self._q.popitem(last=False)[0] if self._q else None

    def __len__(self) -> int:
        return len(self._q)


class HintedLRU(EvictionPolicy):
    """LRU that inserts a block at the cold end (first to go) when ``cold(key)`` says so:
    the bound of what knowing which blocks come back would buy (``measure_bound``)."""

    def __init__(self, capacity: int, cold: Callable[[Any], bool],
                 seen: Callable[[Any], None] | None = None,
                 dropped: Callable[[Any], None] | None = None) -> None:
        super().__init__(capacity)
        self._od: OrderedDict[Any, None] = OrderedDict()
        self._cold, self._seen, self._dropped = cold, seen, dropped

    def insert(self, key: SequenceHash, priority: int = 0) -> None:
        self._od[key] = None
        if self._cold(key):
            self._od.move_to_end(key, last=False)

    def touch(self, key: SequenceHash) -> None:
        if self._seen is not None:
            self._seen(key)
        if key in self._od:
            self._od.move_to_end(key)

    def pin(self, key: SequenceHash) -> None:
        self._od.pop(key, None)

    def unpin(self, key: SequenceHash) -> None:
        self._od[key] = None
        self._od.move_to_end(key)

    def remove(self, key: SequenceHash) -> None:
        self._od.pop(key, None)

    def victim(self) -> SequenceHash | None:
        if not self._od:
            return None
        k: SequenceHash = self._od.popitem(last=False)[0]
        if self._dropped is not None:
            self._dropped(k)
        return k

    def __len__(self) -> int:
        return len(self._od)


class _Learner:
    """Online estimate of P(a block is hit again) per request class, from a sample of
    requests whose blocks are inserted normally (one in ``every``: whole requests, as a
    block is only hit behind its prefix); other blocks of a class whose estimate is
    under ``threshold`` are inserted cold. No look-ahead: only past hits count."""

    def __init__(self, cls_of: dict[int, Any], req_of: dict[int, int], threshold: float = 0.1,
                 every: int = 8) -> None:
        self.cls_of, self.req_of, self.threshold, self.every = cls_of, req_of, threshold, every
        self.inserted: dict[Any, int] = {}
        self.reused: dict[Any, int] = {}
        self.tracked: dict[Any, Any] = {}

    def cold(self, key: Any) -> bool:
        c = self.cls_of[key]
        if self.req_of[key] % self.every == 0:  # the sample: inserted hot, its fate counted
            self.inserted[c] = self.inserted.get(c, 0) + 1
            self.tracked[key] = c
            return False
        return (self.reused.get(c, 0) + 1) / (self.inserted.get(c, 0) + 2) < self.threshold

    def hit(self, key: Any) -> None:
        c = self.tracked.pop(key, None)
        if c is not None:
            self.reused[c] = self.reused.get(c, 0) + 1

    def dropped(self, key: Any) -> None:
        self.tracked.pop(key, None)


def measure_bound(path: Any) -> dict[str, Any]:
    """Mooncake: what an online policy would need to know to reach 0.8 of OPT.

    OPT is exact here (every block's parent is accessed whenever it is, one step
    earlier, so Belady never keeps a child without its parent: its block hits are
    prefix hits, and no policy's prefix hits exceed its block hits). The rows hint LRU
    which blocks will not come back: from the future (oracles), or learned online
    from the request's prompt or output length, which the policy hooks do not carry.
    """
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    t = load_mooncake(path)
    cap = max(1, t.working_set // 4)
    opt = belady(t, cap)
    count: dict[int, int] = {}
    first: dict[int, int] = {}
    for ri, r in enumerate(t.requests):
        for k in r:
            count[k] = count.get(k, 0) + 1
            first.setdefault(k, ri)
    once_share = [sum(count[k] == 1 for k in r) / len(r) for r in t.requests]
    out_cls = {k: int(rows[ri]["output_length"]).bit_length() for k, ri in first.items()}
    len_cls = {k: len(t.requests[ri]).bit_length() for k, ri in first.items()}
    both_cls = {k: (out_cls[k], len_cls[k]) for k in first}
    seen: set[int] = set()
    inf_hits = 0
    for r in t.requests:
        n = 0
        while n < len(r) and r[n] in seen:
            n += 1
        inf_hits += n
        seen.update(r)
    variants: list[tuple[str, Callable[[], EvictionPolicy]]] = [
        ("lru", lambda: LRUPolicy(cap)),
        ("oracle: a block read once goes first", lambda: HintedLRU(cap, lambda k: count[k] == 1)),
        ("oracle: a request whose blocks are mostly read once goes first",
         lambda: HintedLRU(cap, lambda k: once_share[first[k]] > 0.5)),
    ]
    for label, classes in (("output length", out_cls), ("prompt length", len_cls),
                           ("both", both_cls)):
        def learned(classes: dict[int, Any] = classes) -> EvictionPolicy:
            learner = _Learner(classes, first)
            return HintedLRU(cap, learner.cold, learner.hit, learner.dropped)
        variants.append((f"learned online: P(reuse) per {label} class (log2)", learned))
    res = {}
    for label, make in variants:
        sim = replay(t, make(), cap, label)
        res[label] = {"hit_rate": sim.hit_rate, "of_opt": sim.hit_rate / opt.hit_rate}
    return {"capacity": cap, "opt_hit_rate": opt.hit_rate,
            "infinite_cache_hit_rate": inf_hits / t.accesses,
            "read_once_share": sum(v == 1 for v in count.values()) / len(count), "rows": res}


def traces(expanded: bool) -> list[Trace]:
    """Every family at its defaults, then the public Mooncake trace when present."""
    out = [make_workload(name) for name in FAMILIES]
    path = find_mooncake()
    if path is not None:
        out.append(load_mooncake(path))
        if expanded:
            out.append(load_mooncake(path, blocks_per_id=32))
    return out


def _label(t: Trace) -> str:
    fam = str(t.info.get("family", t.name))
    return f"{fam} (16-token)" if fam == "mooncake" and t.tokens_per_key == 16 else fam


def measure_single(ts: list[Trace], names: list[str]) -> dict[str, Any]:
    """Hit rate, share of OPT and points over LRU per policy per trace, at 1/4."""
    plugins = build_plugins()
    out: dict[str, Any] = {}
    for t in ts:
        cap = max(1, t.working_set // 4)
        opt = belady(t, cap).hit_rate
        rows = {}
        for name in names:
            cls = plugins.policies.get_kind("eviction", name).load()
            r = replay(t, cls(cap), cap, name)
            rows[name] = {"hit_rate": r.hit_rate, "of_opt": r.hit_rate / opt if opt else 0.0}
        lru = rows["lru"]["hit_rate"]
        for row in rows.values():
            row["vs_lru_pt"] = (row["hit_rate"] - lru) * 100
        out[_label(t)] = {"accesses": t.accesses, "working_set": t.working_set, "capacity": cap,
                          "opt_hit_rate": opt, "info": t.info, "policies": rows}
        print(f"  single tier: {_label(t)} done", file=sys.stderr)
    return out


def _native_floor(t: Trace, cap: int) -> float:
    """The C loop with FIFO's work (``kvbm_policies.native.replay_fifo``), in accesses
    per CPU second, timed as ``replay`` times a native replay."""
    c0 = time.process_time()
    native.replay_fifo(t, cap, True)
    cpu = time.process_time() - c0
    return t.accesses / cpu if cpu > 0 else 0.0


def measure_speed(ts: list[Trace], names: list[str], repeats: int) -> dict[str, Any]:
    """Accesses per CPU second per policy per trace: min, median and max of ``repeats``
    replays, interleaved (each repeat runs every policy once, the FIFO floors first), and
    each policy's median as a share of its loop's floor, the limit measured in the same
    run: FIFO through the Python loop, or, for the policies the fast engine runs in C
    (``kvbm_policies.native``), FIFO through the C loop. Those policies are also run
    through the Python loop (the ``(python loop)`` rows, against the Python floor)."""
    plugins = build_plugins()
    out: dict[str, Any] = {}
    use_native = native.available()
    for t in ts:
        cap = max(1, t.working_set // 4)
        makers: list[tuple[str, Any, str]] = [("fifo (floor)", FIFOPolicy, "fast")]
        if use_native:
            makers.append((NATIVE_FLOOR, None, "native"))
        policies = [(n, plugins.policies.get_kind("eviction", n).load()) for n in names]
        in_c = {n for n, cls in policies if native.supports(cls(cap))}
        makers += [(n, cls, "fast") for n, cls in policies]
        makers += [(f"{n} (python loop)", cls, "python") for n, cls in policies if n in in_c]
        makers.append(("lru via BlockRegistry", LRUPolicy, "registry"))
        samples: dict[str, list[float]] = {name: [] for name, _, _ in makers}
        load = [os.getloadavg()[0]]
        for _ in range(repeats):
            for name, cls, engine in makers:
                if engine == "native":
                    samples[name].append(_native_floor(t, cap))
                else:
                    samples[name].append(replay(t, cls(cap), cap, name, engine=engine).ops_per_s)
        load.append(os.getloadavg()[0])
        floors = {name: statistics.median(samples[name]) for name in ("fifo (floor)", NATIVE_FLOOR)
                  if name in samples}
        row = {}
        for name, v in samples.items():
            fl = NATIVE_FLOOR if name in in_c or name == NATIVE_FLOOR else "fifo (floor)"
            med = statistics.median(v)
            row[name] = {"min": min(v), "median": med, "max": max(v), "floor": fl,
                         "of_floor": med / floors[fl] if floors[fl] else 0.0}
        out[_label(t)] = {"accesses": t.accesses, "load_average": load, "ops_per_s": row}
        print(f"  speed: {_label(t)} done", file=sys.stderr)
    return out


def measure_chain(ts: list[Trace], spec: tuple[float, float] = (1 / 16, 1 / 4)) -> dict[str, Any]:
    """The chain runs of ``CHAIN_RUNS`` on every trace."""
    plugins = build_plugins()
    out: dict[str, Any] = {}
    for t in ts:
        if t.tokens_per_key != 512 and t.accesses > 1_000_000:
            continue  # the expanded Mooncake trace: minutes per run through the planner
        host, disk = max(1, int(t.working_set * spec[0])), max(1, int(t.working_set * spec[1]))
        runs: dict[str, Any] = {}
        opt = None
        for label, hp, dp, adm in CHAIN_RUNS:
            a_name, a_opts = parse_named(adm, disk)
            tiers = [ChainTier("host", host, hp), ChainTier("disk", disk, dp, a_name,
                                                              admission_options=a_opts)]
            r = simulate_chain(t, tiers, plugins, opt=opt is None)
            opt = r.opt_hit_rate if opt is None else opt
            runs[label] = {"hit_rate": r.hit_rate, "host_hits": r.tiers[0].hits / r.accesses,
                           "disk_hits": r.tiers[1].hits / r.accesses,
                           "disk_written": r.tiers[1].written, "disk_bytes": r.tiers[1].bytes_written,
                           "host_written": r.tiers[0].written, "seconds": r.seconds}
        out[_label(t)] = {"host": host, "disk": disk, "opt_hit_rate": opt, "runs": runs}
        print(f"  chain: {_label(t)} done", file=sys.stderr)
    return out


def measure_cascade(ts: list[Trace], spec: tuple[float, float, float] = (1 / 16, 1 / 4, 1.0)
                    ) -> dict[str, Any]:
    """Host, disk, bucket: the runs of ``CASCADE_RUNS`` on every trace."""
    plugins = build_plugins()
    out: dict[str, Any] = {}
    for t in ts:
        if t.tokens_per_key != 512 and t.accesses > 1_000_000:
            continue
        sizes = [max(1, int(t.working_set * f)) for f in spec]
        runs: dict[str, Any] = {}
        for label, adm, bypass in CASCADE_RUNS:
            a_name, a_opts = parse_named(adm, sizes[1])
            tiers = [ChainTier("host", sizes[0]),
                     ChainTier("disk", sizes[1], admission=a_name, admission_options=a_opts),
                     ChainTier("s3", sizes[2])]
            r = simulate_chain(t, tiers, plugins, opt=False, bypass_refused=bypass)
            runs[label] = {"hit_rate": r.hit_rate,
                           **{f"{x.name}_hits": x.hits / r.accesses for x in r.tiers},
                           **{f"{x.name}_written": x.written for x in r.tiers}}
        out[_label(t)] = {"sizes": sizes, "runs": runs}
        print(f"  cascade: {_label(t)} done", file=sys.stderr)
    return out


def print_markdown(doc: dict[str, Any]) -> None:
    """The tables as Markdown."""
    if "single" in doc:
        single = doc["single"]
        names = list(next(iter(single.values()))["policies"])
        print("## One tier, capacity 1/4 of the working set: hit rate / OPT (points vs LRU)\n")
        print("| policy | " + " | ".join(single) + " |")
        print("| --- |" + " ---: |" * len(single))
        print("| OPT hit rate | " + " | ".join(f"{v['opt_hit_rate']:.1%}" for v in single.values()) + " |")
        for n in names:
            cells = [f"{v['policies'][n]['of_opt']:.3f} ({v['policies'][n]['vs_lru_pt']:+.1f})"
                     for v in single.values()]
            print(f"| {n} | " + " | ".join(cells) + " |")
        print()
        for fam, v in single.items():
            params = ", ".join(f"{k}={x}" for k, x in v["info"].items() if k != "family")
            print(f"- {fam}: {v['accesses']:,} accesses, working set {v['working_set']:,}, "
                  f"capacity {v['capacity']:,}; {params}")
        print()
    if "speed" in doc:
        speed = doc["speed"]
        names = list(next(iter(speed.values()))["ops_per_s"])
        print("## Speed: block accesses per CPU second, median (min-max) of the repeats, "
              "and the median as a share of its loop's FIFO floor (the C floor for the "
              "policies run in C, marked *)\n")
        print("| policy | " + " | ".join(speed) + " |")
        print("| --- |" + " ---: |" * len(speed))
        for n in names:
            cells = []
            for v in speed.values():
                x = v["ops_per_s"][n]
                cells.append(f"{x['median'] / 1e6:.2f} M ({x['min'] / 1e6:.2f}-{x['max'] / 1e6:.2f}) "
                             f"{x['of_floor']:.0%}")
            c_row = next(iter(speed.values()))["ops_per_s"][n].get("floor") == NATIVE_FLOOR
            label = f"{n} *" if c_row and n != NATIVE_FLOOR else n
            print(f"| {label} | " + " | ".join(cells) + " |")
        print("| load average (1 min) before, after | "
              + " | ".join(f"{v['load_average'][0]:.1f}, {v['load_average'][1]:.1f}"
                           for v in speed.values()) + " |")
        print()
    if "chain" in doc:
        print("## Chain host 1/16 -> disk 1/4, write-through: prefix hit rate, disk writes\n")
        for fam, v in doc["chain"].items():
            print(f"### {fam} (host {v['host']:,}, disk {v['disk']:,} keys; OPT at "
                  f"{v['host'] + v['disk']:,}: {v['opt_hit_rate']:.1%})\n")
            print("| host, disk eviction, disk admission | hit rate | host | disk | disk writes |"
                  " vs admit-all (same eviction) |")
            print("| --- | ---: | ---: | ---: | ---: | --- |")
            base: dict[tuple[str, str], dict[str, Any]] = {}
            for (label, hp, dp, adm), r in zip(CHAIN_RUNS, v["runs"].values()):
                if adm == "all":
                    base[(hp, dp)] = r
                b = base.get((hp, dp))
                vs = ""
                if b is not None and b is not r and b["disk_written"]:
                    vs = (f"writes {r['disk_written'] / b['disk_written'] - 1:+.0%}, "
                          f"hit rate {(r['hit_rate'] - b['hit_rate']) * 100:+.1f} pt")
                print(f"| {label} | {r['hit_rate']:.2%} | {r['host_hits']:.2%} | {r['disk_hits']:.2%} "
                      f"| {r['disk_written']:,} | {vs} |")
            print()
    if "cascade" in doc:
        print("## Cascade host 1/16 -> disk 1/4 -> s3 1: a block the disk refuses, stopped or "
              "passed on\n")
        print("| workload | disk admission, cascade | hit rate | host | disk | s3 | disk writes "
              "| s3 writes |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for fam, v in doc["cascade"].items():
            for label, r in v["runs"].items():
                print(f"| {fam} | {label} | {r['hit_rate']:.2%} | {r['host_hits']:.2%} | "
                      f"{r['disk_hits']:.2%} | {r['s3_hits']:.2%} | {r['disk_written']:,} | "
                      f"{r['s3_written']:,} |")
        print()
    if "bound" in doc:
        b = doc["bound"]
        print(f"## Mooncake: what reaching 0.8 of OPT would take (capacity {b['capacity']:,}; OPT "
              f"{b['opt_hit_rate']:.2%}, infinite cache {b['infinite_cache_hit_rate']:.2%}, "
              f"ids read once {b['read_once_share']:.1%})\n")
        print("| LRU hinted by | hit rate | of OPT |")
        print("| --- | ---: | ---: |")
        for label, r in b["rows"].items():
            print(f"| {label} | {r['hit_rate']:.2%} | {r['of_opt']:.3f} |")
        print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=3, help="speed replays per policy; the fastest counts")
    ap.add_argument("--only", default="single,speed,chain,cascade,bound",
                    help="which of single, speed, chain, cascade, bound")
    ap.add_argument("--expanded", action="store_true",
                    help="also the Mooncake trace at 16-token pages (32 blocks per id)")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",")}
    plugins = build_plugins()
    names = sorted(e.name for e in plugins.policies if e.kind == "eviction" and e.available)
    ts = traces(args.expanded)
    doc: dict[str, Any] = {"benchmark": "policies", "fraction": 0.25}
    if "single" in parts:
        doc["single"] = measure_single(ts, names)
    if "speed" in parts:
        doc["speed"] = measure_speed(ts, names, args.repeats)
    if "chain" in parts:
        doc["chain"] = measure_chain(ts)
    if "cascade" in parts:
        doc["cascade"] = measure_cascade(ts)
    path = find_mooncake()
    if "bound" in parts and path is not None:
        doc["bound"] = measure_bound(path)
    if args.json:
        print(json.dumps(doc))
    else:
        print_markdown(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

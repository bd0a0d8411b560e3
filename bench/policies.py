"""Eviction and admission policies over every workload family and the public Mooncake trace.

Three measurements, each printed as the Markdown table ``docs/benchmarks/policies.md``
carries:

1. One tier at a quarter of each trace's working set: every installed eviction policy's
   hit rate as a share of Belady's OPT (the ceiling) and its difference to LRU in
   points. Each family's parameters are printed beside it.
2. Speed: block accesses replayed per CPU second, best of ``--repeats``, through the
   fast engine (the registry's calls in a tight loop), beside a FIFO policy (the
   least work a policy can do) and LRU through the real ``BlockRegistry``.
3. A chain, host at 1/16 and disk at 1/4 of the working set, write-through: prefix hit
   rate, each tier's share, blocks written to disk, for the eviction policies and disk
   admission filters named in ``CHAIN_RUNS``.

    .venv/bin/python bench/policies.py [--repeats 3] [--json] [--only single,speed,chain]
                                       [--expanded]   # Mooncake at 16-token pages too (3.9 M accesses)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Any

from kvbm.hashing import SequenceHash
from kvbm.plugins import build_plugins
from kvbm.policy import EvictionPolicy, LRUPolicy
from kvbm_policies.chain import ChainTier, parse_named, simulate_chain
from kvbm_policies.families import FAMILIES, make_workload
from kvbm_policies.replay import belady, replay
from kvbm_policies.workloads import Trace, find_mooncake, load_mooncake

#: (label, host eviction, disk eviction, disk admission). Today's default chain is
#: lru / lru / frequency (Dynamo's filter is the disk tier's default admission).
CHAIN_RUNS: list[tuple[str, str, str, str]] = [
    ("lru, lru, all", "lru", "lru", "all"),
    ("lru, lru, frequency (default)", "lru", "lru", "frequency"),
    ("lru, lru, tinylfu", "lru", "lru", "tinylfu"),
    ("lru, lru, reuse 2x", "lru", "lru", "reuse:window=2x"),
    ("lru, adaptive, all", "lru", "adaptive", "all"),
    ("lru, adaptive, frequency", "lru", "adaptive", "frequency"),
    ("lru, adaptive, reuse 2x", "lru", "adaptive", "reuse:window=2x"),
    ("adaptive, adaptive, all", "adaptive", "adaptive", "all"),
    ("adaptive, adaptive, reuse 2x", "adaptive", "adaptive", "reuse:window=2x"),
]


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


def measure_speed(ts: list[Trace], names: list[str], repeats: int) -> dict[str, Any]:
    """Accesses per CPU second per policy per trace (best of ``repeats``)."""
    plugins = build_plugins()
    out: dict[str, Any] = {}
    for t in ts:
        cap = max(1, t.working_set // 4)
        row: dict[str, float] = {}
        for name, make in [("fifo (floor)", FIFOPolicy),
                           *[(n, plugins.policies.get_kind("eviction", n).load()) for n in names]]:
            row[name] = max(replay(t, make(cap), cap, name).ops_per_s for _ in range(repeats))
        row["lru via BlockRegistry"] = max(replay(t, LRUPolicy(cap), cap, engine="registry").ops_per_s
                                           for _ in range(repeats))
        out[_label(t)] = {"accesses": t.accesses, "ops_per_s": row}
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


def print_markdown(doc: dict[str, Any]) -> None:
    """The three tables as Markdown."""
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
        print("## Speed: block accesses per CPU second (best of the repeats)\n")
        print("| policy | " + " | ".join(speed) + " |")
        print("| --- |" + " ---: |" * len(speed))
        for n in names:
            print(f"| {n} | " + " | ".join(f"{v['ops_per_s'][n] / 1e6:.2f} M" for v in speed.values())
                  + " |")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=3, help="speed replays per policy; the fastest counts")
    ap.add_argument("--only", default="single,speed,chain", help="which of single, speed, chain")
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
    if args.json:
        print(json.dumps(doc))
    else:
        print_markdown(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kvbm simulate``: replay a block-access trace against each eviction policy and OPT.

Access model, per request: the hit is the strict prefix, the leading run of its keys
the cache holds; those blocks are pinned (``BlockRegistry.pin``: a hit), the request's
missing blocks are allocated and committed in order (evicting through the policy),
then the pins are released, last block first, as vLLM and Dynamo free a request's
blocks, so that a prefix's tail ages before its head. The replay runs through the
real ``kvbm.registry.BlockRegistry``, so what is measured is what a tier would do.

Belady's OPT is the ceiling: offline, on the same flattened access sequence, it
evicts the cached block whose next access is furthest in the future. With strict
prefix hits OPT is the classic bound, not a proof of optimality, but no online
policy here has come near to passing it.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvbm.policy import EvictionPolicy
from kvbm.registry import BlockRegistry

from .workloads import Trace, load_mooncake, multi_turn_trace

__all__ = ["SimResult", "add_arguments", "belady", "replay", "run", "run_simulation"]

DEFAULT_TRACE = "/work/shared/traces/mooncake_synthetic_trace.jsonl"


@dataclass
class SimResult:
    """Hit rate and speed of one policy on one trace at one capacity."""

    policy: str
    capacity: int
    accesses: int
    hits: int
    evictions: int
    seconds: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def ops_per_s(self) -> float:
        """Block accesses replayed per second (lookup, pin or allocate+commit, unpin)."""
        return self.accesses / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        d["ops_per_s"] = self.ops_per_s
        return d


def replay(
    trace: Trace,
    policy: EvictionPolicy,
    capacity: int,
    name: str = "",
    release: str = "reverse",
    priorities: Callable[[int, int], int] | None = None,
) -> SimResult:
    """Replay ``trace`` through a ``BlockRegistry`` of ``capacity`` slots using ``policy``.

    ``release`` is the order pins are dropped in: ``"reverse"`` (tail first, the
    default) or ``"forward"``. ``priorities(request_index, block_index)`` gives each
    new block's priority (default 0).
    """
    if release not in ("reverse", "forward"):
        raise ValueError(f"release must be 'reverse' or 'forward', got {release!r}")
    reg = BlockRegistry("simulate", capacity, policy)
    pin, allocate, commit, unpin = reg.pin, reg.allocate, reg.commit, reg.unpin
    take_evicted = reg.take_evicted
    reverse = release == "reverse"
    hits = 0
    t0 = time.perf_counter()
    for ri, keys in enumerate(trace.requests):
        pinned: list[int] = []
        for k in keys:
            slot = pin(k)  # type: ignore[arg-type]
            if slot is None:
                break
            pinned.append(slot)
        n = len(pinned)
        hits += n
        for bi in range(n, len(keys)):
            slot = allocate(keys[bi])  # type: ignore[arg-type]
            if slot is not None:
                commit(slot, priorities(ri, bi) if priorities is not None else 0)
        if reverse:
            pinned.reverse()
        for slot in pinned:
            unpin(slot)
        take_evicted()  # no storage to discard from; keeps the list from growing
    seconds = time.perf_counter() - t0
    return SimResult(name or type(policy).__name__, capacity, trace.accesses, hits, reg.evictions, seconds)


def belady(trace: Trace, capacity: int) -> SimResult:
    """Belady's OPT on the flattened access sequence, with strict-prefix hits."""
    flat = [k for r in trace.requests for k in r]
    never = len(flat) + 1
    nxt = [0] * len(flat)
    last: dict[int, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        k = flat[i]
        nxt[i] = last.get(k, never)
        last[k] = i
    t0 = time.perf_counter()
    cached: dict[int, int] = {}  # key -> its next access
    heap: list[tuple[int, int]] = []  # (-next access, key); stale entries skipped
    hits = evictions = 0
    t = 0
    for keys in trace.requests:
        n = 0
        while n < len(keys) and keys[n] in cached:
            n += 1
        hits += n
        for k in keys:
            nu = nxt[t]
            t += 1
            if k not in cached and len(cached) >= capacity:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if cached.get(victim) == -neg:
                        del cached[victim]
                        evictions += 1
                        break
            cached[k] = nu
            heapq.heappush(heap, (-nu, k))
        if len(heap) > 4 * capacity + 64:
            heap = [(-v, k) for k, v in cached.items()]
            heapq.heapify(heap)
    return SimResult("OPT (Belady)", capacity, trace.accesses, hits, evictions, time.perf_counter() - t0)


def run_simulation(
    trace: Trace,
    policies: Sequence[str],
    capacity: int,
    release: str = "reverse",
    plugins: Any = None,
) -> tuple[SimResult, list[SimResult]]:
    """OPT and one replay per named eviction policy (resolved through the plugins)."""
    from kvbm.plugins import build_plugins

    plugins = plugins or build_plugins()
    classes = [(name, plugins.policies.get_kind("eviction", name).load()) for name in policies]
    opt = belady(trace, capacity)
    results = [replay(trace, cls(capacity), capacity, name, release) for name, cls in classes]
    return opt, results


def format_table(trace: Trace, capacity: int, opt: SimResult, results: list[SimResult]) -> str:
    """The report: each policy's hit rate beside OPT's, and its speed."""
    ws = trace.working_set
    lines = [
        f"trace: {trace.name}: {len(trace.requests)} requests, {trace.accesses} accesses, "
        f"working set {ws} ({trace.unit}s)",
        f"capacity: {capacity} ({capacity / ws:.1%} of the working set)",
        "",
        f"{'policy':<14} {'hit rate':>9} {'of OPT':>8} {'accesses/s':>12} {'evictions':>10}",
        f"{'OPT (Belady)':<14} {opt.hit_rate:>9.2%} {1:>8.1%} {'offline':>12} {opt.evictions:>10}",
    ]
    best = max(results, key=lambda r: r.hit_rate, default=None)
    for r in results:
        ratio = r.hit_rate / opt.hit_rate if opt.hit_rate else 0.0
        mark = "  <- best" if r is best else ""
        lines.append(f"{r.policy:<14} {r.hit_rate:>9.2%} {ratio:>8.1%} {r.ops_per_s:>12,.0f} "
                     f"{r.evictions:>10}{mark}")
    return "\n".join(lines)


def load_trace(args: argparse.Namespace) -> Trace:
    """The trace the command line names."""
    if args.trace == "multi-turn":
        return multi_turn_trace(users=args.users, rounds=args.rounds, page_size=args.page_size,
                                seed=args.seed)
    return load_mooncake(args.trace, blocks_per_id=args.blocks_per_id, limit=args.limit)


def run(args: argparse.Namespace) -> int:
    """Run ``kvbm simulate`` with parsed arguments; returns the exit status."""
    from kvbm.plugins import build_plugins

    plugins = build_plugins()
    names = [n.strip() for n in args.policies.split(",") if n.strip()] if args.policies else sorted(
        e.name for e in plugins.policies if e.kind == "eviction" and e.available)
    try:
        trace = load_trace(args)
    except OSError as e:
        print(f"kvbm simulate: cannot read trace {args.trace!r}: {e}", file=sys.stderr)
        return 2
    ws = trace.working_set
    capacity = args.capacity if args.capacity is not None else max(1, int(ws * args.fraction))
    if capacity < 1:
        print(f"kvbm simulate: --capacity must be at least 1, got {capacity}", file=sys.stderr)
        return 2
    opt, results = run_simulation(trace, names, capacity, args.release, plugins)
    if args.json:
        print(json.dumps({
            "trace": trace.name, "unit": trace.unit, "requests": len(trace.requests),
            "accesses": trace.accesses, "working_set": ws, "capacity": capacity,
            "release": args.release, "opt": opt.as_dict(),
            "policies": [r.as_dict() | {"of_opt": r.hit_rate / opt.hit_rate if opt.hit_rate else 0.0}
                         for r in results],
        }))
    else:
        print(format_table(trace, capacity, opt, results))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The simulator's options (shared with ``bench/policies.py``)."""
    p.add_argument("--trace", default="multi-turn",
                   help="'multi-turn' (the built-in workload) or a Mooncake-format JSONL file, "
                        f"e.g. {DEFAULT_TRACE}")
    p.add_argument("--policies", default=None,
                   help="comma-separated eviction policies (default: every installed one)")
    p.add_argument("--capacity", type=int, default=None, help="cache size in trace keys")
    p.add_argument("--fraction", type=float, default=0.25,
                   help="cache size as a fraction of the working set when --capacity is not given")
    p.add_argument("--release", choices=("reverse", "forward"), default="reverse",
                   help="order a request's pins are dropped in (reverse: tail block first)")
    p.add_argument("--users", type=int, default=32, help="multi-turn: conversations")
    p.add_argument("--rounds", type=int, default=8, help="multi-turn: turns per conversation")
    p.add_argument("--page-size", type=int, default=16, help="multi-turn: tokens per block")
    p.add_argument("--seed", type=int, default=0, help="multi-turn: random seed")
    p.add_argument("--blocks-per-id", type=int, default=1,
                   help="Mooncake: blocks per 512-token hash id (32 for 16-token pages; 1 keeps ids)")
    p.add_argument("--limit", type=int, default=None, help="Mooncake: replay only the first N requests")
    p.add_argument("--json", action="store_true", help="print one JSON object")


"""Replaying a trace against one eviction policy, and Belady's OPT on the same trace.

Access model, per request: the hit is the strict prefix, the leading run of its keys
the cache holds; those blocks are pinned (a hit: ``pin`` then ``touch``), the request's
missing blocks are allocated and committed in order (evicting through ``victim`` when
the tier is full), then the pins are released, last block first, as vLLM and Dynamo
free a request's blocks, so that a prefix's tail ages before its head.

Two engines run that model. ``engine="registry"`` drives the real
``kvbm.registry.BlockRegistry``, the code a tier runs. ``engine="fast"`` (the default)
makes the very same calls on the policy in the very same order from a tight loop
over a set of cached keys, without the registry's slot bookkeeping: three to six
times the speed, and equal results (hits, evictions, every victim), which
``tests/test_policies_replay.py`` checks on random traces for every policy. A trace
with a key repeated inside one request (pin counts above one) always takes the
registry. For W-TinyLFU, the prefix-aware LRU and LIRS, freshly built, ``"fast"``
runs the whole loop in C (``kvbm_policies.native``: the same calls, the same victims,
the policy object left as built) when a C compiler is at hand; ``engine="python"``
always runs the Python loop. A policy with an optional ``prepare_keys(keys)`` method (not part of the
contract) is first given the trace's distinct keys, inside the timed part, to compute
per-key constants (sketch positions, sample membership) in one numpy pass.

Belady's OPT is the ceiling: offline, on the same flattened access sequence, it
evicts the cached block whose next access is furthest in the future. With strict
prefix hits OPT is the classic bound, not a proof of optimality, but no online
policy here has come near to passing it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kvbm.policy import EvictionPolicy
from kvbm.registry import BlockRegistry

from . import native
from .workloads import Trace

__all__ = ["SimResult", "belady", "replay"]


@dataclass
class SimResult:
    """Hit rate and speed of one policy on one trace at one capacity."""

    policy: str
    capacity: int
    accesses: int
    hits: int
    evictions: int
    seconds: float  # wall clock
    #: CPU time of the replay: on a shared machine the wall clock also counts other
    #: processes' turns, so speeds are per CPU second (0: not measured).
    cpu_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Hit blocks over accessed blocks (each request's hit is its leading cached run)."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def ops_per_s(self) -> float:
        """Block accesses replayed per CPU second (lookup, pin or allocate+commit, unpin)."""
        t = self.cpu_seconds or self.seconds
        return self.accesses / t if t > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields and the two derived figures, for JSON."""
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
    engine: str = "fast",
) -> SimResult:
    """Replay ``trace`` through a tier of ``capacity`` slots evicting with ``policy``.

    ``release`` is the order pins are dropped in: ``"reverse"`` (tail first, the
    default) or ``"forward"``. ``priorities(request_index, block_index)`` gives each
    new block's priority (default 0). ``engine`` is ``"fast"``, ``"python"`` (the fast
    loop, never the native one) or ``"registry"`` (see the module's docstring); all give
    the same result.
    """
    if release not in ("reverse", "forward"):
        raise ValueError(f"release must be 'reverse' or 'forward', got {release!r}")
    if engine not in ("fast", "python", "registry"):
        raise ValueError(f"engine must be 'fast', 'python' or 'registry', got {engine!r}")
    if capacity < 1:
        raise ValueError(f"capacity must be at least one block, got {capacity}")
    label = name or type(policy).__name__
    if engine == "fast":
        native.available()  # built once per process, before any timing
    if engine == "registry" or trace.has_repeats:
        return _replay_registry(trace, policy, capacity, label, release, priorities)
    return _replay_fast(trace, policy, capacity, label, release, priorities, engine == "fast")


def _replay_fast(trace: Trace, policy: EvictionPolicy, capacity: int, name: str, release: str,
                 priorities: Callable[[int, int], int] | None, try_native: bool = True) -> SimResult:
    # The registry's calls on the policy, in its order: pin+touch per hit, victim (when
    # full) + insert per new block, unpin per hit. Every name a local: this loop is the
    # simulator's speed. Trace keys are ints where a tier has 16-byte hashes; policies
    # only hash and compare keys, so the loop passes them as they are.
    pin: Callable[[Any], None] = policy.pin
    touch: Callable[[Any], None] = policy.touch
    unpin: Callable[[Any], None] = policy.unpin
    insert: Callable[[Any, int], None] = policy.insert
    victim = policy.victim
    cached: set[Any] = set()
    add, discard = cached.add, cached.discard
    reverse = release == "reverse"
    free = capacity
    hits = evictions = 0
    t0, c0 = time.perf_counter(), time.process_time()
    if try_native and priorities is None:
        got = native.replay(trace, policy, capacity, reverse)
        if got is not None:  # timed alike: the keys' ranks and the C loop
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            return SimResult(name, capacity, trace.accesses, got[0], got[1], seconds, cpu)
    prepare = getattr(policy, "prepare_keys", None)
    if prepare is not None:  # timed: the bulk pass is part of the replay's cost
        seen: set[Any] = set()
        for keys in trace.requests:
            seen.update(keys)
        prepare(list(seen))
    if priorities is None:
        # The common case, without the per-block priority call and block index.
        for keys in trace.requests:
            n = 0
            for k in keys:
                if k not in cached:
                    break
                pin(k)
                touch(k)
                n += 1
            if n:
                hits += n
                for k in keys[n:]:
                    if k not in cached:
                        if free:
                            free -= 1
                        else:
                            v = victim()
                            if v is None:
                                continue  # every block pinned: the registry skips the write
                            discard(v)
                            evictions += 1
                        add(k)
                        insert(k, 0)
                for k in (reversed(keys[:n]) if reverse else keys[:n]):
                    unpin(k)
            else:
                for k in keys:
                    if k not in cached:
                        if free:
                            free -= 1
                        else:
                            v = victim()
                            if v is None:
                                continue
                            discard(v)
                            evictions += 1
                        add(k)
                        insert(k, 0)
    else:
        for ri, keys in enumerate(trace.requests):
            n = 0
            for k in keys:
                if k not in cached:
                    break
                pin(k)
                touch(k)
                n += 1
            hits += n
            bi = n
            for k in keys[n:] if n else keys:
                if k not in cached:
                    if free:
                        free -= 1
                    else:
                        v = victim()
                        if v is None:
                            bi += 1
                            continue  # every block pinned: the registry skips the write
                        discard(v)
                        evictions += 1
                    add(k)
                    insert(k, priorities(ri, bi))
                bi += 1
            if n:
                for k in (reversed(keys[:n]) if reverse else keys[:n]):
                    unpin(k)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return SimResult(name, capacity, trace.accesses, hits, evictions, seconds, cpu)


def _replay_registry(trace: Trace, policy: EvictionPolicy, capacity: int, name: str, release: str,
                     priorities: Callable[[int, int], int] | None) -> SimResult:
    reg = BlockRegistry("simulate", capacity, policy)
    pin, allocate, commit, unpin = reg.pin, reg.allocate, reg.commit, reg.unpin
    take_evicted = reg.take_evicted
    reverse = release == "reverse"
    hits = 0
    t0, c0 = time.perf_counter(), time.process_time()
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
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return SimResult(name, capacity, trace.accesses, hits, reg.evictions, seconds, cpu)


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

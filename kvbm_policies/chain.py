"""The chain simulator: a trace through host, then disk (then S3), with each tier's filter.

It drives the core's own ``kvbm.planner.Planner`` (the registries, pins, admission
filters, write-through cascade, re-offers and promotions every real chain runs)
with an executor that does no I/O and reports every operation done. Per request, as
``kvbm bench`` does: match the prefix down the chain, onboard it (blocks from a lower
tier are promoted into the first, when it admits them), release the match, then
offload every block of the prompt (blocks the first tier holds are re-offered to the
second: that is what lets Dynamo's frequency filter see reuse). What is counted:

- the prefix hit rate (a request's hit is the longest run of its leading blocks the
  chain holds), and the share served by each tier;
- the blocks and bytes written to each tier (saves, cascade copies, promotions): SSD
  write volume is why Dynamo filters disk admission;
- Belady's OPT for one cache as large as the whole chain, the ceiling.

Admission filters that take a ``clock`` (Dynamo's frequency filter decays once a
period) get the trace's clock: Mooncake's timestamps, or for a generated trace one
request every ``interval`` seconds.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvbm.chain import TierState, admission_options
from kvbm.config import TierConfig
from kvbm.plan import Plan, Report
from kvbm.planner import Planner
from kvbm.policy import AdmissionPolicy, EvictionPolicy
from kvbm.registry import BlockRegistry
from kvbm.tier import Tier

from .replay import belady
from .workloads import Trace

__all__ = ["ChainResult", "ChainTier", "TierResult", "parse_chain", "parse_named", "simulate_chain"]

#: Llama-3-8B in bf16: 32 layers x 8 KV heads x 128 x (K, V) x 2 bytes per token, so a
#: 16-token block is 2 MiB, as in ``kvbm bench``.
BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2


@dataclass
class ChainTier:
    """One tier of a simulated chain: its name, size in keys and policies by name."""

    name: str
    capacity: int
    policy: str = "lru"
    admission: str = "all"
    policy_options: dict[str, Any] = field(default_factory=dict)
    admission_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TierResult:
    """What one tier did over the trace."""

    name: str
    capacity: int
    policy: str
    admission: str
    hits: int  # blocks of matched prefixes this tier served
    written: int  # blocks written into it: saves, cascade copies and promotions
    bytes_written: int
    rejected: int  # blocks its admission filter refused
    evictions: int

    def as_dict(self, accesses: int) -> dict[str, Any]:
        """The fields and this tier's share of all accessed blocks, for JSON."""
        return {**self.__dict__, "hit_rate": self.hits / accesses if accesses else 0.0}


@dataclass
class ChainResult:
    """The whole chain over one trace: prefix hits, per-tier figures, OPT and speed."""

    label: str
    accesses: int
    hits: int
    tiers: list[TierResult]
    opt_hit_rate: float
    seconds: float

    @property
    def hit_rate(self) -> float:
        """Prefix hit blocks over accessed blocks, whichever tier served them."""
        return self.hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Everything, for JSON."""
        return {"label": self.label, "accesses": self.accesses, "hits": self.hits,
                "hit_rate": self.hit_rate, "opt_hit_rate": self.opt_hit_rate,
                "of_opt": self.hit_rate / self.opt_hit_rate if self.opt_hit_rate else 0.0,
                "seconds": self.seconds,
                "tiers": [t.as_dict(self.accesses) for t in self.tiers]}


class _SimTier(Tier):
    """What the planner asks of a tier class (not shared, serves no peers); never built."""

    def write(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the chain simulator moves no bytes")

    def read(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the chain simulator moves no bytes")


def parse_chain(spec: str, working_set: int) -> list[ChainTier]:
    """``"host:1/16,disk:1/4,s3:1"``: tier names with sizes as fractions of the working set
    (``1/4``, ``0.25``) or as block counts (an integer above 1)."""
    tiers: list[ChainTier] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, size = part.partition(":")
        name = name.strip()
        if not name or not size:
            raise ValueError(f"chain {spec!r}: each tier is NAME:SIZE (e.g. host:1/16), got {part!r}")
        try:
            if "/" in size:
                num, den = size.split("/", 1)
                frac = float(num) / float(den)
                n = int(working_set * frac)
            elif "." in size or float(size) <= 1:
                n = int(working_set * float(size))
            else:
                n = int(size)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"chain {spec!r}: size {size!r} of tier {name!r} is not a fraction "
                             f"(1/4, 0.25) or a block count; e.g. host:1/16,disk:1/4") from None
        tiers.append(ChainTier(name, max(1, n)))
    if not tiers:
        raise ValueError(f"chain {spec!r} names no tier; e.g. host:1/16,disk:1/4")
    return tiers


def parse_named(spec: str, capacity: int) -> tuple[str, dict[str, Any]]:
    """``"reuse:window=2x"``: a policy or filter name with options; a value ``Nx`` is N times
    ``capacity`` (the tier's size in keys), numbers are numbers, the rest strings."""
    name, *opts = [p.strip() for p in spec.split(":")]
    options: dict[str, Any] = {}
    for o in opts:
        key, sep, value = o.partition("=")
        if not sep or not key:
            raise ValueError(f"{spec!r}: options are KEY=VALUE after the name, e.g. reuse:window=2x")
        v: Any = value
        try:
            if value.endswith("x"):
                v = max(1, round(float(value[:-1]) * capacity))
            elif value.lstrip("-").isdigit():
                v = int(value)
            else:
                v = float(value)
        except ValueError:
            v = value
        options[key] = v
    return name, options


def _build(cls: Any, options: dict[str, Any], clock: Callable[[], float] | None,
           capacity: int) -> Any:
    # The core's rule (a filter that declares ``capacity`` gets its tier's size), plus
    # the trace's clock for filters that take one.
    kwargs = admission_options(cls, options, capacity)
    if clock is not None:
        try:
            if "clock" in inspect.signature(cls).parameters:
                return cls(clock=clock, **kwargs)
        except (TypeError, ValueError):  # no signature to read: build it plainly
            pass
    return cls(**kwargs)


def simulate_chain(
    trace: Trace,
    tiers: Sequence[ChainTier],
    plugins: Any = None,
    bytes_per_token: int = BYTES_PER_TOKEN,
    interval: float = 0.1,
    label: str = "",
    opt: bool = True,
    bypass_refused: bool = True,
) -> ChainResult:
    """Replay ``trace`` through the chain ``tiers`` (first = fastest) with write-through;
    ``bypass_refused``: a block a tier's filter refuses goes on to the tier below it
    (``kvbm.planner.Planner``'s option of that name)."""
    from kvbm.plugins import build_plugins

    plugins = plugins or build_plugins()
    now = [0.0]

    def clock() -> float:
        return now[0]

    states: list[TierState] = []
    for i, t in enumerate(tiers):
        ev_cls = plugins.policies.get_kind("eviction", t.policy).load()
        eviction: EvictionPolicy = ev_cls(t.capacity, **t.policy_options)
        admission: AdmissionPolicy = _build(plugins.policies.get_kind("admission", t.admission).load(),
                                            t.admission_options, clock, t.capacity)
        cfg = TierConfig(type=t.name, num_blocks=t.capacity)
        states.append(TierState(t.name, i, _SimTier, cfg,
                                BlockRegistry(t.name, t.capacity, eviction), admission))
    planner = Planner(states, page_size=trace.tokens_per_key, write_through=True,
                      bypass_refused=bypass_refused)
    written = [0] * len(states)
    index = {s.name: s.index for s in states}

    def run(plan: Plan) -> None:
        # The executor, minus the bytes: count each write, report every operation done.
        while plan.saves or plan.copies or plan.loads:
            report: Report = {}
            for op in plan.saves:
                written[op.tier] += len(op.slots)
                report[op.op_id] = frozenset()
            for c in plan.copies:
                written[c.dst_tier] += len(c.dst_slots)
                report[c.op_id] = frozenset()
            for ld in plan.loads:
                report[ld.op_id] = frozenset()
                if ld.promote_op:
                    written[ld.promote_tier] += sum(1 for s in ld.promote_slots if s >= 0)
                    report[ld.promote_op] = frozenset()
            plan = planner.apply(report)

    served = [0] * len(states)
    hits = 0
    requests = trace.keys_as_bytes()
    times = trace.times
    t0 = time.perf_counter()
    for ri, keys in enumerate(requests):
        now[0] = times[ri] if times is not None else ri * interval
        m = planner.match(keys)  # type: ignore[arg-type]
        n = m.num_blocks
        if n:
            hits += n
            for name in m.tiers:
                served[index[name]] += 1
            load = planner.plan_load(m, list(range(n)))
            plan = Plan(loads=[load])
            run(plan)
        m.release()
        run(planner.plan_save(keys, list(range(len(keys)))).plan)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    bpk = trace.tokens_per_key * bytes_per_token
    results = [TierResult(t.name, t.capacity, t.policy, t.admission, served[i], written[i],
                          written[i] * bpk, states[i].rejected, states[i].registry.evictions)
               for i, t in enumerate(tiers)]
    ceiling = belady(trace, sum(t.capacity for t in tiers)).hit_rate if opt else 0.0
    name = label or " -> ".join(f"{t.name}({t.policy}, {t.admission})" for t in tiers)
    return ChainResult(name, trace.accesses, hits, results, ceiling, seconds)

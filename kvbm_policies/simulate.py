"""``kvbm simulate``: replay a workload against eviction policies (one tier) or a chain.

One tier (the default): every named eviction policy replays the trace at the same
capacity (a quarter of the working set unless told), beside Belady's OPT, with its
hit rate, its share of OPT, its difference to LRU in points and its speed
(``kvbm_policies.replay``). With ``--chain host:1/16,disk:1/4`` the trace goes
through a whole write-through chain driven by the core's planner, once per eviction
policy and admission filter named, reporting each tier's hits and bytes written
(``kvbm_policies.chain``).

Workloads: the families of ``kvbm_policies.families`` (``--workload``, parameters with
``--param key=value``; ``--list-workloads`` prints them with their defaults), the
public Mooncake trace beside the repository (``--workload mooncake``: see
``shared/traces/README.md``) or any Mooncake-format file (``--trace FILE``).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from collections.abc import Sequence
from typing import Any

from .chain import BYTES_PER_TOKEN, ChainResult, parse_chain, parse_named, simulate_chain
from .families import FAMILIES, make_workload
from .replay import SimResult, belady, replay
from .workloads import MOONCAKE_NAME, Trace, find_mooncake, load_mooncake

__all__ = ["SimResult", "add_arguments", "belady", "format_chain", "format_table", "load_trace",
           "replay", "run", "run_chain", "run_simulation", "workload_help"]

# Legacy flags, passed to a family only when given and only if it takes them.
_SHORTCUTS = ("users", "rounds", "page_size", "seed")


def run_simulation(
    trace: Trace,
    policies: Sequence[str],
    capacity: int,
    release: str = "reverse",
    plugins: Any = None,
    engine: str = "fast",
) -> tuple[SimResult, list[SimResult]]:
    """OPT and one replay per named eviction policy (resolved through the plugins); a name
    may carry options, ``lirs:hir_ratio=0.05``."""
    from kvbm.plugins import build_plugins

    plugins = plugins or build_plugins()
    built = []
    for spec in policies:
        name, options = parse_named(spec, capacity)
        built.append((spec, plugins.policies.get_kind("eviction", name).load(), options))
    opt = belady(trace, capacity)
    results = [replay(trace, cls(capacity, **options), capacity, spec, release, engine=engine)
               for spec, cls, options in built]
    return opt, results


def _params_line(trace: Trace) -> str:
    items = [f"{k}={v}" for k, v in trace.info.items() if k != "family"]
    return "parameters: " + (", ".join(items) if items else "none")


def format_table(trace: Trace, capacity: int, opt: SimResult, results: list[SimResult]) -> str:
    """The one-tier report: each policy's hit rate beside OPT's and LRU's, and its speed."""
    ws = trace.working_set
    lru = next((r for r in results if r.policy == "lru"), None)
    w = max([14, *(len(r.policy) for r in results)])
    lines = [
        f"trace: {trace.name}: {len(trace.requests)} requests, {trace.accesses} accesses, "
        f"working set {ws} ({trace.unit}s)",
        _params_line(trace),
        f"capacity: {capacity} ({capacity / ws:.1%} of the working set)",
        "",
        f"{'policy':<{w}} {'hit rate':>9} {'of OPT':>8} {'vs LRU':>8} {'accesses/s':>12} {'evictions':>10}",
        f"{'OPT (Belady)':<{w}} {opt.hit_rate:>9.2%} {1:>8.1%} {'':>8} {'offline':>12} {opt.evictions:>10}",
    ]
    best = max(results, key=lambda r: r.hit_rate, default=None)
    for r in results:
        ratio = r.hit_rate / opt.hit_rate if opt.hit_rate else 0.0
        vs = f"{(r.hit_rate - lru.hit_rate) * 100:+.1f} pt" if lru is not None else "-"
        mark = "  <- best" if r is best else ""
        lines.append(f"{r.policy:<{w}} {r.hit_rate:>9.2%} {ratio:>8.1%} {vs:>8} {r.ops_per_s:>12,.0f} "
                     f"{r.evictions:>10}{mark}")
    return "\n".join(lines)


def run_chain(trace: Trace, spec: str, policies: Sequence[str], admissions: Sequence[str],
              plugins: Any = None, bytes_per_token: int = BYTES_PER_TOKEN,
              interval: float = 0.1, cascades: Sequence[str] = ("bypass",)) -> list[ChainResult]:
    """One chain replay per (eviction policy of every tier, admission filter of the second
    tier, cascade); tiers below the second admit all. Cascade ``bypass`` (the planner's
    default): a block the second tier refuses is copied past it to the third; ``stop``:
    it goes no further (the planner before ``bypass_refused``)."""
    from kvbm.plugins import build_plugins

    plugins = plugins or build_plugins()
    for c in cascades:
        if c not in ("stop", "bypass"):
            raise ValueError(f"--cascade: value {c!r} is not stop or bypass; give e.g. "
                             "--cascade stop,bypass")
    out: list[ChainResult] = []
    opt: float | None = None
    for pol in policies:
        for cascade in cascades:
            for adm in admissions:
                tiers = parse_chain(spec, trace.working_set)
                for i, t in enumerate(tiers):
                    t.policy, t.policy_options = parse_named(pol, t.capacity)
                    if i == 1:
                        # The second tier only (the disk): the one whose SSD writes a
                        # filter saves; lower tiers (a bucket) admit all.
                        t.admission, t.admission_options = parse_named(adm, t.capacity)
                label = f"{pol} / {adm}" + (f" / {cascade}" if len(cascades) > 1 else "")
                res = simulate_chain(trace, tiers, plugins, bytes_per_token, interval,
                                     label=label, opt=opt is None,
                                     bypass_refused=cascade == "bypass")
                if opt is None:
                    opt = res.opt_hit_rate
                res.opt_hit_rate = opt
                out.append(res)
    return out


def format_chain(trace: Trace, spec: str, results: list[ChainResult]) -> str:
    """The chain report: prefix hit rate, each tier's share and bytes written."""
    if not results:
        return "no chain run"
    first = results[0]
    caps = ", ".join(f"{t.name} {t.capacity}" for t in first.tiers)
    lines = [
        f"trace: {trace.name}: {len(trace.requests)} requests, {trace.accesses} accesses, "
        f"working set {trace.working_set} ({trace.unit}s)",
        _params_line(trace),
        f"chain: {spec} -> {caps} keys; write-through; OPT for one cache of "
        f"{sum(t.capacity for t in first.tiers)} keys: {first.opt_hit_rate:.2%}",
        "",
    ]
    w = max([28, *(len(r.label) for r in results)])
    head = f"{'eviction / admission':<{w}} {'hit rate':>9} {'of OPT':>7}"
    for t in first.tiers:
        head += f" | {t.name + ' hits':>10} {t.name + ' written':>14} {'GiB':>9}"
    head += f" {'accesses/s':>11}"
    lines.append(head)
    base: dict[str, ChainResult] = {}
    for r in results:
        parts = r.label.split(" / ")
        pol = " / ".join(parts[:1] + parts[2:])  # the same eviction and cascade
        base.setdefault(pol, r)
        row = f"{r.label:<{w}} {r.hit_rate:>9.2%} {r.hit_rate / r.opt_hit_rate if r.opt_hit_rate else 0:>7.1%}"
        for t in r.tiers:
            row += f" | {t.hits / r.accesses:>10.2%} {t.written:>14,} {t.bytes_written / 2**30:>9,.1f}"
        row += f" {r.accesses / r.seconds if r.seconds else 0:>11,.0f}"
        b = base[pol]
        if r is not b and len(r.tiers) > 1 and b.tiers[1].written:
            low = r.tiers[1]
            row += (f"  ({low.name} writes {low.written / b.tiers[1].written - 1:+.0%}, "
                    f"hit rate {(r.hit_rate - b.hit_rate) * 100:+.1f} pt vs {b.label})")
        lines.append(row)
    return "\n".join(lines)


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param {item!r}: give KEY=VALUE, e.g. --param users=16")
        try:
            v: Any = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            v = value.strip()
        if isinstance(v, list):
            v = tuple(v)
        out[key.strip().replace("-", "_")] = v
    return out


def load_trace(args: argparse.Namespace) -> Trace:
    """The trace the command line names."""
    name = args.workload
    path = args.trace
    if path in FAMILIES or path == "mooncake":  # the old --trace multi-turn spelling
        name, path = path, None
    if path is not None:
        return load_mooncake(path, blocks_per_id=args.blocks_per_id, limit=args.limit)
    if name == "mooncake":
        found = find_mooncake()
        if found is None:
            raise OSError(f"the public Mooncake trace ({MOONCAKE_NAME}) is not in shared/traces/ "
                          "beside this checkout; give its path with --trace")
        return load_mooncake(found, blocks_per_id=args.blocks_per_id, limit=args.limit)
    params = _parse_params(args.param or [])
    accepted = inspect.signature(FAMILIES[name]).parameters
    for key in _SHORTCUTS:
        v = getattr(args, key, None)
        if v is not None and key in accepted:
            params.setdefault(key, v)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"workload {name!r} takes no parameter {unknown[0]!r}; it takes "
                         f"{', '.join(accepted)}")
    return make_workload(name, **params)


def workload_help() -> str:
    """Each family with its first docstring line and its parameters' defaults."""
    lines = []
    for name, gen in FAMILIES.items():
        doc = (inspect.getdoc(gen) or "").split("\n")[0]
        params = ", ".join(f"{p.name}={p.default!r}" for p in inspect.signature(gen).parameters.values())
        lines.append(f"{name}: {doc}\n    {params}")
    lines.append(f"mooncake: the public Mooncake trace ({MOONCAKE_NAME} in shared/traces/, see its "
                 "README)\n    blocks_per_id (--blocks-per-id), limit (--limit)")
    return "\n".join(lines)


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else []


def run(args: argparse.Namespace) -> int:
    """Run ``kvbm simulate`` with parsed arguments; returns the exit status."""
    from kvbm.errors import PluginError
    from kvbm.plugins import build_plugins

    if args.list_workloads:
        print(workload_help())
        return 0
    plugins = build_plugins()
    try:
        trace = load_trace(args)
    except OSError as e:
        print(f"kvbm simulate: cannot read trace {args.trace or args.workload!r}: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"kvbm simulate: {e}", file=sys.stderr)
        return 2
    try:
        if args.chain:
            pols = _names(args.policies) or ["lru"]
            adms = _names(args.admission) or ["all", "frequency"]
            chain_results = run_chain(trace, args.chain, pols, adms, plugins, args.bytes_per_token,
                                      args.interval, _names(args.cascade) or ["bypass"])
            if args.json:
                print(json.dumps({"trace": trace.name, "info": trace.info, "unit": trace.unit,
                                  "requests": len(trace.requests), "accesses": trace.accesses,
                                  "working_set": trace.working_set, "chain": args.chain,
                                  "runs": [r.as_dict() for r in chain_results]}))
            else:
                print(format_chain(trace, args.chain, chain_results))
            return 0
        names = _names(args.policies) or sorted(
            e.name for e in plugins.policies if e.kind == "eviction" and e.available)
        ws = trace.working_set
        capacity = args.capacity if args.capacity is not None else max(1, int(ws * args.fraction))
        if capacity < 1:
            print(f"kvbm simulate: --capacity must be at least 1, got {capacity}", file=sys.stderr)
            return 2
        opt, results = run_simulation(trace, names, capacity, args.release, plugins, args.engine)
    except (ValueError, PluginError) as e:
        print(f"kvbm simulate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "trace": trace.name, "info": trace.info, "unit": trace.unit,
            "requests": len(trace.requests), "accesses": trace.accesses, "working_set": ws,
            "capacity": capacity, "release": args.release, "engine": args.engine,
            "opt": opt.as_dict(),
            "policies": [r.as_dict() | {"of_opt": r.hit_rate / opt.hit_rate if opt.hit_rate else 0.0}
                         for r in results],
        }))
    else:
        print(format_table(trace, capacity, opt, results))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The simulator's options (shared with ``bench/policies.py``)."""
    p.add_argument("--workload", default="multi-turn", choices=[*FAMILIES, "mooncake"],
                   help="workload family, or 'mooncake' for the public trace in shared/traces/ "
                        "(see --list-workloads)")
    p.add_argument("--trace", default=None,
                   help=f"a Mooncake-format JSONL file to replay instead (e.g. {MOONCAKE_NAME})")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a workload parameter, e.g. --param users=16 --param doc_tokens=[4096,8192]")
    p.add_argument("--list-workloads", action="store_true",
                   help="print every workload family with its parameters and defaults")
    p.add_argument("--policies", default=None,
                   help="comma-separated eviction policies (default: every installed one; "
                        "with --chain: lru, for every tier); options follow the name: "
                        "lirs:hir_ratio=0.05")
    p.add_argument("--capacity", type=int, default=None, help="cache size in trace keys")
    p.add_argument("--fraction", type=float, default=0.25,
                   help="cache size as a fraction of the working set when --capacity is not given")
    p.add_argument("--release", choices=("reverse", "forward"), default="reverse",
                   help="order a request's pins are dropped in (reverse: tail block first)")
    p.add_argument("--engine", choices=("fast", "python", "registry"), default="fast",
                   help="fast: the policy calls in a tight loop (in C for wtinylfu, prefix, "
                        "lirs and adaptive when a C compiler is at hand); python: that loop "
                        "in Python always; registry: through kvbm.registry.BlockRegistry "
                        "(same results, slower)")
    p.add_argument("--chain", default=None, metavar="SPEC",
                   help="simulate a write-through chain instead, e.g. host:1/16,disk:1/4,s3:1 "
                        "(sizes: fractions of the working set, or block counts)")
    p.add_argument("--admission", default=None,
                   help="with --chain: comma-separated admission filters for the second tier "
                        "(lower ones admit all), one run each (default: all,frequency); options "
                        "follow the name, a value Nx is N times the tier's size: reuse:window=2x")
    p.add_argument("--cascade", default=None,
                   help="with --chain: what happens to a block the second tier's filter refuses: "
                        "bypass (copied past it to the next tier, the planner's default) or stop "
                        "(goes no further); comma-separated for one run each (default: bypass)")
    p.add_argument("--bytes-per-token", type=int, default=BYTES_PER_TOKEN,
                   help="KV bytes per token, for bytes written (default: Llama-3-8B bf16, 128 KiB)")
    p.add_argument("--interval", type=float, default=0.1,
                   help="with --chain: seconds between requests of a generated workload, the clock "
                        "of time-decayed filters (Mooncake files carry their own timestamps)")
    p.add_argument("--users", type=int, default=None, help="multi-turn, long-docs: conversations")
    p.add_argument("--rounds", type=int, default=None, help="multi-turn, long-docs: turns each")
    p.add_argument("--page-size", type=int, default=None, help="generated workloads: tokens per block")
    p.add_argument("--seed", type=int, default=None, help="generated workloads: random seed")
    p.add_argument("--blocks-per-id", type=int, default=1,
                   help="Mooncake: blocks per 512-token hash id (32 for 16-token pages; 1 keeps ids)")
    p.add_argument("--limit", type=int, default=None, help="Mooncake: replay only the first N requests")
    p.add_argument("--json", action="store_true", help="print one JSON object")

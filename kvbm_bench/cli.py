"""The ``kvbm bench`` subcommand: its arguments and the function that runs it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .config import BenchOptions


def command(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``kvbm bench``'s arguments to ``p``; return the function that runs it."""
    p.add_argument("--config", help="YAML chain to run (default: the embedded host+disk chain)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--users", type=int, default=16, help="conversations (default 16)")
    p.add_argument("--rounds", type=int, default=8, help="turns per conversation (default 8)")
    p.add_argument("--system-tokens", type=int, default=1024, help="shared system prompt length")
    p.add_argument("--duration", type=float, default=90.0, help="stop the workload after this many seconds")
    p.add_argument("--raw-blocks", type=int, default=512,
                   help="blocks in the contiguous phase (whole blocks of the chain's size)")
    p.add_argument("--engine", choices=["none", "hf", "vllm"], default="none",
                   help="'hf' runs a real transformers model, 'vllm' a real vLLM engine "
                        "(time to first token)")
    p.add_argument("--limit-mib", type=int, default=512,
                   help="MiB that each fio run and dd move for a disk limit (default 512; "
                        "fio runs 3 times at each of the 5 samples around the workload's parts)")
    p.add_argument("--out", default=None,
                   help="results folder: report.json, paths.csv and PNG plots (default: "
                        "bench-out/kvbm-bench-<UTC time> in the current directory)")
    p.add_argument("--no-out", action="store_true", help="write no results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--local", choices=["s3", "remote"], default=None,
                   help="run host + that tier with its server started here on 127.0.0.1: a fresh "
                        "moto server (s3) or a serving NIXL peer process holding the workload's "
                        "blocks (remote); see kvbm_bench/local.py")
    from . import hf, vllm_bench

    hf.add_arguments(p)
    vllm_bench.add_arguments(p)
    return run


def run(args: argparse.Namespace) -> int:
    """Run the bench the parsed arguments describe; 1 if any onboarded block mismatched."""
    if args.engine == "hf":
        from . import hf

        return int(hf.run_hf_bench(args))
    if args.engine == "vllm":
        from . import vllm_bench

        return vllm_bench.run_vllm_bench(args)
    from .progress import Progress
    from .runner import PHASES, environment_note, format_report, run_bench

    opts = BenchOptions(
        config=args.config, users=args.users, rounds=args.rounds,
        system_tokens=args.system_tokens, duration=args.duration, raw_blocks=args.raw_blocks,
        progress=not args.no_progress, limit_bytes=args.limit_mib * 2**20,
    )
    bar = Progress(PHASES, opts.progress)
    if opts.progress:
        print(f"kvbm bench: {len(PHASES)} phases ({', '.join(PHASES)}); the workload stops after "
              f"{opts.duration:g} s at most", file=sys.stderr, flush=True)
    if args.local:
        from .local import local_chain

        with local_chain(args.local, opts) as path:
            opts.config = path
            report = run_bench(opts, bar)
    else:
        report = run_bench(opts, bar)
    data = report.to_json()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"kvbm bench ({environment_note()})")
        print(format_report(report))
    if not args.no_out:
        from .results import default_out_dir, write_results

        out = Path(args.out) if args.out else default_out_dir()
        data["latencies_ms"] = {"match": report.match_ms, "onboard": report.onboard_ms}
        data["environment"] = environment_note()
        written = write_results(data, out)
        files = [w for w in written if " " not in w]
        notes = [w for w in written if " " in w]
        print(f"results: {out}/ ({', '.join(files)})", file=sys.stderr if args.json else sys.stdout)
        for n in notes:
            print(f"note: {n}", file=sys.stderr if args.json else sys.stdout)
    return 1 if report.mismatched_blocks else 0

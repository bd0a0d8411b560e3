"""The ``kvbm bench`` subcommand: its arguments and the function that runs it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .config import BenchOptions


def command(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Add ``kvbm bench``'s arguments to ``p``; return the function that runs it."""
    p.add_argument("--config", help="YAML chain to run (default: the embedded host+disk chain)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--users", type=int, default=16, help="conversations (default 16)")
    p.add_argument("--rounds", type=int, default=8, help="turns per conversation (default 8)")
    p.add_argument("--system-tokens", type=int, default=1024, help="shared system prompt length")
    p.add_argument("--duration", type=float, default=90.0, help="stop the workload after this many seconds")
    p.add_argument("--raw-blocks", type=int, default=512, help="blocks in the contiguous 2 MiB phase")
    p.add_argument("--engine", choices=["none", "hf", "vllm"], default="none",
                   help="'hf' runs a real transformers model, 'vllm' a real vLLM engine "
                        "(time to first token)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    from .runner import environment_note, format_report, run_bench

    opts = BenchOptions(
        config=args.config, users=args.users, rounds=args.rounds,
        system_tokens=args.system_tokens, duration=args.duration, raw_blocks=args.raw_blocks,
        progress=not args.no_progress and not args.json,
    )
    report = run_bench(opts)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"kvbm bench ({environment_note()})")
        print(format_report(report))
    return 1 if report.mismatched_blocks else 0

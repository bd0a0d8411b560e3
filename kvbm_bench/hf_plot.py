"""The ``kvbm bench --engine hf`` plot: time to first token per turn, and the shared
prefix's and no-reuse requests' beside their limit (``kvbm_bench.hf``)."""

from __future__ import annotations

from typing import Any


def plot(rep: Any, path: str) -> tuple[str | None, str | None]:
    """Write ``rep``'s (an ``HfBenchReport``) plot to ``path``: ``(path, None)``, or
    ``(None, why not)`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed; no plot (pip install matplotlib)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [t["turn"] for t in rep.turns]
    w = 0.38
    ax1.bar([x - w / 2 for x in xs], [t["ttft_plain"] for t in rep.turns], w, label="without kvbm")
    ax1.bar([x + w / 2 for x in xs], [t["ttft_kvbm"] for t in rep.turns], w, label="with kvbm")
    ax1.set_xticks(xs, [f"{t['turn']}\n{t['prompt_tokens']} tok" for t in rep.turns])
    ax1.set_xlabel("turn (prompt length)")
    ax1.set_ylabel("time to first token (s)")
    ax1.set_title("multi-turn conversation")
    ax1.legend()
    pf = rep.prefix
    nr = rep.no_reuse
    names = ["recompute\n(no kvbm)", "kvbm\nfirst (store)", "kvbm\nprefix loaded", "limit\ncopy+suffix",
             "no reuse\nno kvbm", "no reuse\nkvbm"]
    vals = [pf["ttft_plain"], pf["ttft_kvbm_first"], pf["ttft_kvbm_hit"], pf["limit_ttft"],
            nr["ttft_plain_min"], nr["ttft_kvbm_min"]]
    colors = ["C0", "C1", "C1", "C2", "C0", "C1"]
    ax2.bar(range(len(vals)), vals, color=colors)
    ax2.set_xticks(range(len(vals)), names, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("time to first token (s, log)")
    ax2.set_title(f"{pf['prefix_tokens']}-token shared prefix: {pf['speedup']:.1f}x; "
                  f"no reuse: kvbm adds {nr['kvbm_own_pct']:.2f}%")
    fig.suptitle(f"kvbm with transformers: random Llama {rep.model['layers']}x{rep.model['hidden']}, "
                 f"fp32 CPU ({rep.environment})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, None

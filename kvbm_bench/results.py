"""``kvbm bench``'s results folder: ``report.json``, ``paths.csv`` and PNG plots.

The plots need matplotlib (``pip install 'kvbm[plot]'``); without it the folder has the
JSON and CSV and one line says the plots were skipped.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

CSV_FIELDS = ["path", "blocks", "bytes", "seconds", "gbps", "limit", "limit_gbps", "ratio",
              "failures"]


def default_out_dir() -> Path:
    """``bench-out/kvbm-bench-<UTC timestamp>`` under the current directory."""
    return Path("bench-out") / time.strftime("kvbm-bench-%Y%m%d-%H%M%S", time.gmtime())


def write_results(report: dict[str, Any], out: Path) -> list[str]:
    """Write the folder; return what was written (file names) and notes, one per line."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "paths.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for name, p in sorted(report["paths"].items()):
            w.writerow({"path": name, **{k: p.get(k) for k in CSV_FIELDS[1:]}})
    lines = ["report.json", "paths.csv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines.append("plots skipped: matplotlib is not installed (pip install 'kvbm[plot]')")
        return lines
    names = sorted(report["paths"])
    gbps = [report["paths"][n]["gbps"] for n in names]
    lim = [report["paths"][n].get("limit_gbps") or 0.0 for n in names]
    # A disk path's ratio is the median of its pairs with fio, not its GB/s over the limit.
    ratio = [report["paths"][n].get("ratio") for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], gbps, width=0.4, label="kvbm")
    ax.bar([x + 0.2 for x in xs], lim, width=0.4, label="limit (same run)")
    for x, g, li, r in zip(xs, gbps, lim, ratio):
        if li:
            r = r if r is not None else g / li
            ax.annotate(f"{r:.2f}x", (x - 0.2, g), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title(f"kvbm bench: {' -> '.join(report['chain'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "paths.png", dpi=100)
    plt.close(fig)
    lines.append("paths.png")
    lat = report.get("latencies_ms") or {}
    if lat.get("onboard") or lat.get("match"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, xs_ in lat.items():
            if xs_:
                s = sorted(xs_)
                ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=key)
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title("match and onboard latency (CDF)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        lines.append("latency.png")
    return lines

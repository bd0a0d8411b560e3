"""What ``kvbm bench`` runs: its options and the embedded default chain."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from kvbm.plugins import build_plugins

DEFAULT_MODEL = {"name": "llama-3-8b-like", "num_layers": 32, "num_kv_heads": 8,
                 "head_dim": 128, "dtype": "bfloat16"}


@dataclass
class BenchOptions:
    """What ``kvbm bench`` runs."""

    config: str | None = None
    users: int = 16
    rounds: int = 8
    system_tokens: int = 1024
    duration: float = 90.0
    seed: int = 0
    raw_blocks: int = 512
    raw_batch: int = 64
    progress: bool = True
    limit_bytes: int = 512 * 2**20  # bytes fio and dd move per measurement


def default_settings(tmpdir: str) -> dict[str, Any]:
    """The embedded default chain: host DRAM, then a disk tier under ``tmpdir`` if installed."""
    tiers: list[dict[str, Any]] = [{"type": "host", "capacity": "4GiB"}]
    plugins = build_plugins()
    # Enough disk to hold the default workload's history (about 12 GiB), but never
    # more than half the free space, so the bench starts on a small disk too.
    disk_bytes = min(16 * 2**30, shutil.disk_usage(tmpdir).free // 2)
    if "disk" in plugins.tiers and plugins.tiers.get("disk").available and disk_bytes >= 2**30:
        tiers.append({"type": "disk", "capacity": disk_bytes, "path": tmpdir})
    return {"model": DEFAULT_MODEL, "page_size": 16, "tiers": tiers}

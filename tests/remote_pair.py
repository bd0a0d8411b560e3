"""What the remote tier's two-process tests share: a tiny model, a fast remote tier
config, and offloading / onboarding a batch of random blocks through a manager."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kvbm import ContiguousBlocks, KvBlockManager

TINY = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float32"}
PAGE = 16
FAST = {"ucx_net_devices": "lo", "publish_interval_s": 0.05, "retry_after_s": 0.2,
        "request_timeout_s": 2.0, "transfer_timeout_s": 5.0}


def config(remote: dict[str, Any]) -> dict[str, Any]:
    return {"model": TINY, "page_size": PAGE,
            "tiers": [{"type": "host", "num_blocks": 64}, {"type": "remote", **FAST, **remote}]}


def offload(mgr: KvBlockManager, n: int, seed: int) -> tuple[list[int], np.ndarray]:
    tokens = [seed * 1_000_003 + i for i in range(n * PAGE)]
    data = np.random.default_rng(seed).integers(0, 256, (n, mgr.block_bytes), dtype=np.uint8)
    mgr.offload(mgr.hash_tokens(tokens), ContiguousBlocks(data, mgr.layout))
    mgr.flush()
    time.sleep(0.2)  # let the publisher write the served hashes
    return tokens, data


def onboard(mgr: KvBlockManager, tokens: list[int], n: int) -> tuple[int, np.ndarray]:
    out = np.zeros((n, mgr.block_bytes), dtype=np.uint8)
    with mgr.match_prefix(tokens) as m:
        assert list(m.tiers) == ["remote"] * n
        res = mgr.onboard(m, ContiguousBlocks(out[: m.num_blocks], mgr.layout), promote=False)
    return res.loaded, out

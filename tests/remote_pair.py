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


def _peer_slot(peer: KvBlockManager, tokens: list[int], index: int) -> tuple[Any, Any, bytes, int]:
    host, server = peer.chain[0], peer.chain[-1].tier._server
    key = peer.hash_tokens(tokens)[index]
    return host, server, bytes(key), host.registry.lookup(key)


def flip_after_lease(monkeypatch: Any, peer: KvBlockManager, tokens: list[int], index: int,
                     at: int = 100) -> None:
    """``peer`` flips byte ``at`` of block ``index`` of ``tokens`` right after each lease
    that names it: the lease's sum is taken over the old bytes, the READ sees the new."""
    host, server, key, slot = _peer_slot(peer, tokens, index)
    real = server._lease

    def lease_then_flip(cid: int, keys: list[bytes], ttl: float) -> dict[str, Any]:
        reply = real(cid, keys, ttl)
        if any(bytes(k) == key for k in keys):
            host.tier.slots[slot][at] ^= 0xFF
        return reply

    monkeypatch.setattr(server, "_lease", lease_then_flip)


def rewrite_before_lease(monkeypatch: Any, peer: KvBlockManager, tokens: list[int],
                         index: int, wait_s: float) -> None:
    """``peer`` waits ``wait_s`` (a reader's speculative READ of the old bytes ends
    meanwhile), then writes new bytes into block ``index``'s slot under the same key,
    then leases: the sum is taken over the new bytes."""
    host, server, _, slot = _peer_slot(peer, tokens, index)
    real = server._lease

    def rewrite_then_lease(cid: int, keys: list[bytes], ttl: float) -> dict[str, Any]:
        time.sleep(wait_s)
        host.tier.slots[slot] ^= 0xFF
        return real(cid, keys, ttl)

    monkeypatch.setattr(server, "_lease", rewrite_then_lease)

"""What KV events and Prometheus metrics cost, each beside its baseline in the same run.

1. Request path (hash → match → onboard → offload) in µs per block with KV events on,
   with metrics on, and with neither (the baseline: the same manager code path).
2. KV-event publishing: blocks per second the publisher converts, encodes and sends,
   beside encoding and sending the same messages prebuilt (msgpack + ZMQ alone).
3. One Prometheus scrape over HTTP of a manager, beside a scrape of an empty registry
   on the same kind of server (the HTTP round trip alone).

Run: ``python bench/observability.py [--requests 300] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from typing import Any

import msgpack
import numpy as np
import zmq
from prometheus_client.registry import CollectorRegistry

import kvbm_observability.plugin as obs
from kvbm import ContiguousBlocks, KvBlockManager, build_plugins
from kvbm.events import BlockEvent, EventKind
from kvbm_observability._exposition import serve
from kvbm_observability.kv_events import encode_batch

MODEL = {"name": "bench", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16"}
PAGE = 16


def manager(**kw: Any) -> KvBlockManager:
    cfg = {
        "model": MODEL,
        "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": 1 << 16}],
        **kw,
    }
    return KvBlockManager.from_config(cfg, plugins=build_plugins(extra_plugins=[obs]))


def request_path_us(m: KvBlockManager, requests: int, blocks: int, seed: int = 0) -> float:
    """µs per prompt block of a multi-turn-like loop: half of each prompt is cached."""
    rng = np.random.default_rng(seed)
    src = ContiguousBlocks(np.zeros((blocks, m.block_bytes), np.uint8), m.layout)
    prefix = rng.integers(0, 32000, blocks // 2 * PAGE, dtype=np.uint32)
    total = 0
    t0 = time.perf_counter()
    for _ in range(requests):
        tail = rng.integers(0, 32000, (blocks - blocks // 2) * PAGE, dtype=np.uint32)
        hashes = m.hash_tokens(np.concatenate([prefix, tail]))
        with m.match_prefix(hashes) as match:
            n = match.num_blocks
            if n:
                m.onboard(match, src)
        m.offload(hashes[n:], src, indices=list(range(n, len(hashes))))
        total += len(hashes)
    m.flush()
    dt = time.perf_counter() - t0
    m.events.drain(timeout=60)
    return dt / total * 1e6


def publish_rate(batches: int, per_batch: int) -> tuple[float, float]:
    """(publisher blocks/s, prebuilt msgpack+zmq blocks/s) for BlockStored batches."""
    m = manager(kv_events={"enabled": True, "port": 0})
    try:
        pub = obs.kv_event_publisher(m)
        assert pub is not None
        toks = np.random.default_rng(1).integers(
            0, 32000, batches * per_batch * PAGE, dtype=np.uint32
        )
        hashes = m.hash_tokens(toks)  # fills the token index, as a connector's hashing does
        evs = [
            [BlockEvent(EventKind.REGISTERED, "host", tuple(hashes[i : i + per_batch]), 0.0)]
            for i in range(0, len(hashes), per_batch)
        ]
        t0 = time.perf_counter()
        for e in evs:
            pub(e)
        t_pub = time.perf_counter() - t0
        prebuilt = [
            [
                {
                    "type": "BlockStored",
                    "block_hashes": list(range(per_batch)),
                    "parent_block_hash": 1,
                    "token_ids": toks[: per_batch * PAGE].tolist(),
                    "block_size": PAGE,
                    "lora_id": None,
                    "medium": "CPU",
                    "lora_name": None,
                }
            ]
            for _ in evs
        ]
        sock = zmq.Context.instance().socket(zmq.PUB)
        sock.bind("tcp://127.0.0.1:*")
        t0 = time.perf_counter()
        for i, p in enumerate(prebuilt):
            sock.send_multipart(
                (b"", i.to_bytes(8, "big"), msgpack.packb([0.0, p, 0])), flags=zmq.NOBLOCK
            )
        t_raw = time.perf_counter() - t0
        sock.close(linger=0)
        # The wire encoder itself, for the record: it must equal msgpack's speed.
        encode_batch(0.0, prebuilt[0], 0)
    finally:
        m.close()
    n = batches * per_batch
    return n / t_pub, n / t_raw


def scrape_ms(url: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url) as r:
            r.read()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=64, help="blocks per prompt")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    res: dict[str, Any] = {"requests": a.requests, "blocks_per_prompt": a.blocks}
    configs = {
        "baseline": {},
        "kv_events": {"kv_events": {"enabled": True, "port": 0}},
        "metrics": {"metrics": True, "metrics_port": 0},
    }
    mgrs = {name: manager(**kw) for name, kw in configs.items()}
    try:
        best = dict.fromkeys(configs, float("inf"))
        for m in mgrs.values():
            request_path_us(m, 20, a.blocks, seed=99)  # warm up
        # Rounds interleave the three managers so machine load hits them alike.
        for r in range(a.rounds):
            for name, m in mgrs.items():
                best[name] = min(best[name], request_path_us(m, a.requests, a.blocks, seed=r))
    finally:
        for m in mgrs.values():
            m.close()
    for name, v in best.items():
        res[f"request_us_per_block_{name}"] = v
    base = res["request_us_per_block_baseline"]
    for name in ("kv_events", "metrics"):
        res[f"request_ratio_{name}"] = base / res[f"request_us_per_block_{name}"]

    pub_bps, raw_bps = publish_rate(400, 64)
    res.update(
        publish_blocks_per_s=pub_bps,
        raw_msgpack_zmq_blocks_per_s=raw_bps,
        publish_ratio=pub_bps / raw_bps,
    )

    m = manager(metrics=True, metrics_port=0)
    try:
        request_path_us(m, 20, a.blocks)
        exp = obs.metrics_exporter(m)
        assert exp is not None
        res["scrape_ms"] = scrape_ms(exp.url, 30)
    finally:
        m.close()
    # The same HTTP server as kvbm's endpoint, serving nothing: the round trip alone.
    server, thread = serve(CollectorRegistry(), "127.0.0.1", 0)
    try:
        res["empty_scrape_ms"] = scrape_ms(f"http://127.0.0.1:{server.server_port}/metrics", 30)
    finally:
        server.shutdown()
        server.server_close()
    res["scrape_ratio"] = res["empty_scrape_ms"] / res["scrape_ms"]

    if a.json:
        print(json.dumps(res))
        return
    print(
        f"request path, {a.blocks}-block prompts, half cached, µs per block (ratio = baseline / this):"
    )
    print(f"  baseline (no events, no metrics) {base:8.2f}")
    for name in ("kv_events", "metrics"):
        print(
            f"  {name:<32} {res[f'request_us_per_block_{name}']:8.2f}   ratio {res[f'request_ratio_{name}']:.2f}"
        )
    print("KV-event publishing, BlockStored batches of 64 blocks (ratio = publisher / prebuilt):")
    print(f"  publisher     {pub_bps / 1e3:10.1f} k blocks/s")
    print(f"  msgpack + zmq {raw_bps / 1e3:10.1f} k blocks/s   ratio {res['publish_ratio']:.2f}")
    print("Prometheus scrape over HTTP (ratio = empty registry / kvbm):")
    print(f"  kvbm endpoint   {res['scrape_ms']:7.2f} ms")
    print(f"  empty registry  {res['empty_scrape_ms']:7.2f} ms   ratio {res['scrape_ratio']:.2f}")


if __name__ == "__main__":
    main()

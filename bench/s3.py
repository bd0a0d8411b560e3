"""Put and get 2 MiB blocks through the s3 tier and through raw boto3, same server, same run.

The limit for a tier in front of an object store is the store itself, reached by a
client that does nothing else: raw boto3 with the same connection pool, the same
concurrency (a thread pool of ``--concurrency``), botocore's own retries off and no
extra CRC, putting ready-made ``bytes`` and getting with ``Body.read()``. The tier
does more per block (xxh3 checksum, metadata, conditional put, ranged GET received
into the destination buffer, checksum verify), and its figure is reported beside the
raw one with the ratio. Phases alternate (raw put, tier put, raw get, tier get, then
tier first in the next round) for ``--rounds`` rounds after one warm-up round; the
median round is reported.

By default it starts moto's server (``python -m moto.server``) on a free port of
127.0.0.1; ``--endpoint`` points it at another S3-compatible server (MinIO …) whose
credentials come from the environment. Run:
``python bench/s3.py [--blocks 32] [--concurrency 16] [--rounds 6] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import numpy as np
from botocore.config import Config

from kvbm import Namespace
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.tier import TierContext
from kvbm_tiers_s3.config import S3TierConfig
from kvbm_tiers_s3.tier import S3Tier

BUCKET = "kvbm-bench"


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/")
            c.getresponse().read()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit(f"moto server did not start on port {port}") from None
            time.sleep(0.05)


def layout_2mib(block_mib: int) -> BlockLayout:
    # 32 layers x 2 x 16 tokens x 8 heads x 128 (bf16) = 2 MiB: llama-3-8b's block.
    heads = 8 * block_mib // 2
    return BlockLayout(ModelSpec(num_layers=32, num_kv_heads=heads, head_dim=128,
                                 dtype="bfloat16", name="bench"), 16)


def raw_client(endpoint: str, concurrency: int) -> Any:
    # The tier's own client settings: pool sized to the concurrency, one attempt,
    # no extra CRC, path-style addressing.
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(
        s3={"addressing_style": "path"}, retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=concurrency + 2, request_checksum_calculation="when_required",
        response_checksum_validation="when_required", tcp_keepalive=True))


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=32, help="blocks per phase (default 32)")
    ap.add_argument("--block-mib", type=int, default=2, choices=(1, 2, 4, 8))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--endpoint", help="use this server instead of starting moto")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()

    proc = None
    if a.endpoint:
        endpoint = a.endpoint
    else:
        proc, endpoint = start_moto()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    try:
        res = run(a, endpoint)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"s3 tier vs raw boto3: {a.blocks} blocks of {a.block_mib} MiB per phase, "
          f"concurrency {a.concurrency}, median of {a.rounds} rounds, server {res['server']}")
    print(f"  host memcpy (context)     {res['memcpy_gbps']:7.2f} GB/s")
    for op in ("put", "get"):
        print(f"  {op}: raw boto3 {res[f'raw_{op}_gbps']:6.3f} GB/s   s3 tier "
              f"{res[f'tier_{op}_gbps']:6.3f} GB/s   ratio {res[f'{op}_ratio']:.2f}")
    print("  (the raw boto3 figure is the limit: the same server, pool and concurrency,"
          " no per-block work)")


class Phases:
    """The four timed phases of one round (each moves every block once)."""

    def __init__(self, raw: Any, pool: ThreadPoolExecutor, tier: S3Tier, keys: list[Any],
                 raw_keys: list[str], payloads: list[bytes], data: np.ndarray,
                 dst: np.ndarray) -> None:
        self.raw, self.pool, self.tier = raw, pool, tier
        self.keys, self.raw_keys, self.payloads = keys, raw_keys, payloads
        self.data, self.dst = data, dst

    def _raw_put1(self, kv: tuple[str, bytes]) -> None:
        self.raw.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1])

    def _raw_get1(self, key: str) -> int:
        return len(self.raw.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def raw_put(self) -> None:
        list(self.pool.map(self._raw_put1, zip(self.raw_keys, self.payloads, strict=True)))

    def raw_get(self) -> None:
        sizes = list(self.pool.map(self._raw_get1, self.raw_keys))
        assert all(s == self.data.shape[1] for s in sizes), "raw get: short object"

    def tier_put(self) -> None:
        ok = self.tier.write(range(len(self.keys)), self.keys, list(self.data))
        assert all(ok), f"tier put failed: {self.tier.stats()}"

    def tier_get(self) -> None:
        ok = self.tier.read(range(len(self.keys)), self.keys, list(self.dst))
        assert all(ok), f"tier get failed: {self.tier.stats()}"


def run(a: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    layout = layout_2mib(a.block_mib)
    bb = layout.bytes_per_block
    n, c = a.blocks, a.concurrency
    raw = raw_client(endpoint, c)
    with contextlib.suppress(raw.exceptions.BucketAlreadyOwnedByYou):
        raw.create_bucket(Bucket=BUCKET)
    data = np.random.default_rng(0).integers(0, 256, (n, bb), dtype=np.uint8)
    payloads = [data[i].tobytes() for i in range(n)]
    dst = np.empty_like(data)
    # Context: how fast this host copies the same bytes in memory.
    dst[:] = 1  # fault the pages in first: the figure is the copy, not the page faults
    t0 = time.perf_counter()
    for i in range(n):
        np.copyto(dst[i], data[i])
    memcpy = gbps(n * bb, time.perf_counter() - t0)
    pool = ThreadPoolExecutor(c)
    cfg = S3TierConfig.model_validate({
        "type": "s3", "name": "s3", "bucket": BUCKET, "prefix": "bench", "endpoint_url": endpoint,
        "region": "us-east-1", "addressing_style": "path", "max_concurrency": c,
    })
    rows: dict[str, list[float]] = {k: [] for k in ("raw_put", "tier_put", "raw_get", "tier_get")}
    # One tier and one raw client for the whole run: both keep warm connection pools
    # and threads, as a serving process would; round 0 warms them and is not counted.
    tier = S3Tier(cfg, TierContext("s3", Namespace(model_id=f"bench-{uuid.uuid4().hex}",
                                                   layout_digest=layout.digest),
                                   layout, cfg.resolve_num_blocks(bb)))
    for r in range(a.rounds + 1):
        keys = [uuid.uuid4().bytes for _ in range(n)]
        raw_keys = [f"raw/{uuid.uuid4().hex}/{i}" for i in range(n)]
        phases = Phases(raw, pool, tier, keys, raw_keys, payloads, data, dst)
        # Alternate which client goes first, so that drift in a shared machine's load
        # falls on both alike.
        order = ["raw_put", "tier_put", "raw_get", "tier_get"]
        if r % 2:
            order = ["tier_put", "raw_put", "tier_get", "raw_get"]
        for name in order:
            t0 = time.perf_counter()
            getattr(phases, name)()
            if r:
                rows[name].append(gbps(n * bb, time.perf_counter() - t0))
        assert np.array_equal(dst, data), "tier get: bytes differ"
        dst[:] = 0
        # Keep the server's memory flat across rounds.
        objs = raw_keys + [tier.object_key(k) for k in keys]
        raw.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": o} for o in objs], "Quiet": True})
    tier.close()
    pool.shutdown()
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "server": "moto (python -m moto.server)" if "127.0.0.1" in endpoint else endpoint,
        "blocks": n, "block_bytes": bb, "concurrency": c, "rounds": a.rounds,
        "memcpy_gbps": memcpy,
        **{f"{k}_gbps": v for k, v in med.items()},
        "put_ratio": med["tier_put"] / med["raw_put"],
        "get_ratio": med["tier_get"] / med["raw_get"],
        "rounds_gbps": rows,
    }


if __name__ == "__main__":
    main()

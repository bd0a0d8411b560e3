"""``kvbm bench --local s3|remote``: a chain whose far tier runs on 127.0.0.1, started by
the bench itself, so its row and its limit take one command.

- ``s3``: host DRAM, then an S3 tier on a fresh moto server (``python -m moto.server``,
  the ``test`` extra) on a free port of 127.0.0.1, a new bucket each run: a server left
  from an earlier run would hold the blocks and the conditional put would skip them.
- ``remote``: host DRAM, then a remote tier (NIXL over UCX on ``lo``) whose one peer is
  a second process on 127.0.0.1 (``python -m kvbm_bench.local --serve``) serving its own
  host tier through a temporary rendezvous directory. A remote tier takes no offloads,
  so the peer holds the blocks before the workload starts: it replays the same
  workload (same users, rounds, system prompt and seed) and offloads every block with
  the same byte pattern the bench checks (``runner._pattern_fn``), as a second worker
  that served the same conversations would. The bench's own host tier holds a quarter
  of those blocks, so the older turns' blocks come from the peer.

Both tear down what they started when the bench ends. Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .config import DEFAULT_MODEL, BenchOptions

KINDS = ("s3", "remote")
S3_ACCESS = "kvbm-bench-access"
S3_SECRET = "kvbm-bench-secret"  # a local moto server's: it accepts any pair


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_server(port: int, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kvbm bench --local s3: moto server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/")
            c.getresponse().read()
            c.close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"kvbm bench --local s3: moto server did not answer on "
                                   f"127.0.0.1:{port} in {timeout:g}s") from None
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def host_blocks(total: int) -> int:
    """The bench's own host tier under ``--local``: a quarter of the workload's blocks
    (at least 64), so the older turns' blocks must come from the far tier."""
    return max(64, total // 4)


def workload_blocks(opts: BenchOptions, model: dict[str, Any], page_size: int) -> list[bytes]:
    """Every distinct block hash of the workload ``opts`` describes, in first-use order."""
    from kvbm.manager import KvBlockManager

    from .workload import multi_turn_workload

    mgr = KvBlockManager.from_config({"model": model, "page_size": page_size,
                                      "tiers": [{"type": "host", "num_blocks": 1}]})
    try:
        seen: dict[bytes, None] = {}
        for turn in multi_turn_workload(opts.users, opts.rounds, opts.system_tokens, seed=opts.seed):
            for h in mgr.hash_tokens(turn.tokens):
                seen.setdefault(bytes(h), None)
        return list(seen)
    finally:
        mgr.close()


@contextmanager
def local_chain(kind: str, opts: BenchOptions, model: dict[str, Any] | None = None,
                page_size: int = 16, peer_seed: int | None = None) -> Iterator[str]:
    """Start the far tier's server for ``kind`` on 127.0.0.1; yield the path of a YAML
    chain (host, then that tier) for ``--config``; stop the server after. ``peer_seed``
    (tests only) fills a remote peer with another seed's bytes under the same hashes."""
    if kind not in KINDS:
        raise ValueError(f"kvbm bench --local {kind!r}: not one of {', '.join(KINDS)}; "
                         "use --local s3 or --local remote")
    model = model or DEFAULT_MODEL
    work = tempfile.mkdtemp(prefix="kvbm-bench-local-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        n = len(workload_blocks(opts, model, page_size))
        if kind == "s3":
            tier, proc = _start_s3()
        else:
            tier, proc = _start_peer(opts, model, page_size, work, n, peer_seed)
        path = os.path.join(work, f"kvbm-local-{kind}.json")  # JSON is YAML
        with open(path, "w") as f:
            json.dump({"model": model, "page_size": page_size,
                       "tiers": [{"type": "host", "num_blocks": host_blocks(n)}, tier]}, f)
        yield path
    finally:
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _stop(proc)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _start_s3() -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    import importlib.util

    if importlib.util.find_spec("moto") is None:
        raise RuntimeError("kvbm bench --local s3: moto is not installed (it runs the local S3 "
                           "server); fix: pip install 'kvbm[s3,test]', or pass --config with your S3 tier")
    port = _free_port()
    proc = _moto_server(port)
    bucket = f"kvbm-bench-{uuid.uuid4().hex[:12]}"
    tier = {"type": "s3", "bucket": bucket, "prefix": "bench", "create_bucket": True,
            "endpoint_url": f"http://127.0.0.1:{port}", "region": "us-east-1",
            "addressing_style": "path", "aws_access_key_id": S3_ACCESS,
            "aws_secret_access_key": S3_SECRET, "max_concurrency": 16}
    return tier, proc


def _remote_tier(rdir: str) -> dict[str, Any]:
    return {"type": "remote", "rendezvous_dir": rdir, "ucx_net_devices": "lo",
            "publish_interval_s": 0.1}


def _start_peer(opts: BenchOptions, model: dict[str, Any], page_size: int, work: str,
                n: int, peer_seed: int | None) -> tuple[dict[str, Any], subprocess.Popen[bytes]]:
    from .limits import nixl_importable

    if not nixl_importable():
        raise RuntimeError("kvbm bench --local remote: NIXL is not installed; "
                           "pip install 'kvbm[remote]'")
    rdir = os.path.join(work, "rendezvous")
    os.makedirs(rdir)
    spec = {"model": model, "page_size": page_size, "rdir": rdir, "n": n, "users": opts.users,
            "rounds": opts.rounds, "system_tokens": opts.system_tokens, "seed": opts.seed,
            "pattern_seed": opts.seed if peer_seed is None else peer_seed}
    env = {**os.environ, "UCX_NET_DEVICES": "lo"}
    proc = subprocess.Popen([sys.executable, "-m", "kvbm_bench.local", "--serve", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    line = last = ""
    while line != "READY":  # NIXL prints its own lines on stdout first
        raw = proc.stdout.readline()
        if not raw:
            break
        line = raw.decode(errors="replace").strip()
        last = line or last
    if line != "READY":
        _stop(proc)
        raise RuntimeError(f"kvbm bench --local remote: the peer exited before serving (last line: {last or 'none'})")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    _nixl_log_to_stderr()
    return _remote_tier(rdir), proc


def _nixl_log_to_stderr() -> None:
    """NIXL logs its INFO lines to stdout: moved to stderr, so ``--json`` prints one
    JSON object on stdout."""
    import logging

    try:
        import nixl._api  # noqa: F401  (configures the "nixl" logger)
    except ImportError:
        return
    for h in logging.getLogger("nixl").handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is sys.stdout:
            h.setStream(sys.stderr)


def serve(spec: dict[str, Any]) -> None:
    """The peer: offload every block of the workload with the bench's byte pattern, print
    READY, serve until stdin closes."""
    import numpy as np

    from kvbm.hashing import SequenceHash
    from kvbm.layout import ContiguousBlocks
    from kvbm.manager import KvBlockManager

    from .runner import _pattern_fn

    opts = BenchOptions(users=spec["users"], rounds=spec["rounds"],
                        system_tokens=spec["system_tokens"], seed=spec["seed"])
    keys = workload_blocks(opts, spec["model"], spec["page_size"])
    mgr = KvBlockManager.from_config({"model": spec["model"], "page_size": spec["page_size"],
                                      "tiers": [{"type": "host", "num_blocks": len(keys)},
                                                _remote_tier(spec["rdir"])]})
    try:
        pattern = _pattern_fn(mgr.block_bytes, spec["pattern_seed"])
        batch = 64
        buf = np.empty((batch, mgr.block_bytes), dtype=np.uint8)
        for i in range(0, len(keys), batch):
            part = keys[i : i + batch]
            for j, h in enumerate(part):
                pattern(h, buf[j])
            mgr.offload([SequenceHash(h) for h in part], ContiguousBlocks(buf[: len(part)], mgr.layout))
            mgr.flush()
        time.sleep(0.5)  # a few publish intervals: the served hashes are in the rendezvous
        print("READY", flush=True)
        sys.stdin.readline()
    finally:
        mgr.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m kvbm_bench.local --serve SPEC (started by kvbm bench --local remote)")

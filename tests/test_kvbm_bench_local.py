"""``kvbm bench --local s3|remote``: the far tier's server started by the bench on
127.0.0.1 (a real moto server; a real NIXL peer process), its rows printed beside
their own limits, every onboarded block checked byte for byte. Tiny sizes: a 4 KiB
block, two users, a few turns."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import pytest

from kvbm_bench.config import BenchOptions
from kvbm_bench.local import local_chain
from kvbm_bench.runner import BenchReport, run_bench

# 2 layers x K/V x page 16 x 2 heads x 16 x fp16 = 4 KiB per block.
TINY = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16"}


def _opts() -> BenchOptions:
    return BenchOptions(users=2, rounds=3, system_tokens=64, duration=20, raw_blocks=8,
                        progress=False, limit_bytes=4 * 2**20)


def _bench(kind: str, peer_seed: int | None = None) -> BenchReport:
    opts = _opts()
    with local_chain(kind, opts, model=TINY, peer_seed=peer_seed) as path:
        opts.config = path
        return run_bench(opts)


def _needs(kind: str) -> None:
    if kind == "s3":
        pytest.importorskip("moto", reason="moto is not installed: pip install 'kvbm[test]'")
        pytest.importorskip("boto3", reason="boto3 is not installed: pip install 'kvbm[s3]'")
    else:
        pytest.importorskip("nixl._api", reason="nixl is not installed: pip install 'kvbm[remote]'")


def test_local_s3_prints_both_s3_rows_beside_raw_boto3_with_every_block_verified() -> None:
    _needs("s3")
    r = _bench("s3")
    assert r.chain == ["host:host", "s3:s3"]
    assert r.matched_by_tier.get("s3", 0) > 0
    for op, call in (("offload", "put"), ("onboard", "get")):
        p = r.paths[f"{op}:s3"]
        assert p["limit"].startswith(f"raw boto3 {call} x16") and p["limit_gbps"] > 0, p
        assert p["ratio"] == pytest.approx(p["gbps"] / p["limit_gbps"])
    assert (r.verified_blocks, r.mismatched_blocks) == (r.matched_blocks, 0)


def test_local_s3_adds_the_one_server_row_against_raw_put_and_get_at_their_rates() -> None:
    _needs("s3")
    r = _bench("s3")
    off, on, lim = r.paths["offload:s3"], r.paths["onboard:s3"], r.limits
    both = r.paths["offload+onboard:s3[one server]"]
    assert both["bytes"] == off["bytes"] + on["bytes"]
    raw_s = off["bytes"] / lim["boto3_put:s3"] / 1e9 + on["bytes"] / lim["boto3_get:s3"] / 1e9
    assert both["ratio"] == pytest.approx(raw_s / both["seconds"])
    # Busy time is a union: never more than the two paths' summed seconds.
    assert 0 < both["seconds"] <= off["seconds"] + on["seconds"] + 0.05


def test_local_s3_bytes_changed_after_the_tiers_read_are_counted_mismatched(monkeypatch: Any) -> None:
    """Negative control of the check above: the same run with the S3 tier's reads
    altered after its own checksum check reports mismatched blocks."""
    _needs("s3")
    from kvbm_tiers_s3.tier import S3Tier

    real = S3Tier.read

    def flipped(self: Any, slots: Any, keys: Any, dst: Any) -> list[bool]:
        ok = real(self, slots, keys, dst)
        for d, g in zip(dst, ok):
            if g:
                np.bitwise_xor(d[:8], 0xFF, out=d[:8])
        return ok

    monkeypatch.setattr(S3Tier, "read", flipped)
    r = _bench("s3")
    assert r.matched_by_tier.get("s3", 0) > 0
    assert r.mismatched_blocks >= r.matched_by_tier["s3"] > 0


def test_local_remote_prints_a_remote_row_beside_a_raw_nixl_read_with_every_block_verified() -> None:
    _needs("remote")
    r = _bench("remote")
    assert r.chain == ["host:host", "remote:remote"]
    assert r.matched_by_tier.get("remote", 0) > 0
    p = r.paths["onboard:remote"]
    assert p["limit"].startswith("raw NIXL READ, same peer") and p["limit_gbps"] > 0, (p, r.limit_notes)
    end = p.get("end_limit_gbps", p["limit_gbps"])  # the READ after the workload
    assert 0 < p["read_copy_gbps"] <= end  # the READ, then the engine copy
    if "pair_ratios" in p:  # the READ sampled around the workload's windows (remotepair)
        assert "paired around" in p["limit"] and p["ratio"] == pytest.approx(
            statistics.median(p["pair_ratios"]))
    else:
        assert p["ratio"] == pytest.approx(p["gbps"] / p["limit_gbps"])
    assert (r.verified_blocks, r.mismatched_blocks) == (r.matched_blocks, 0)


def test_local_remote_peer_holding_other_bytes_is_counted_mismatched() -> None:
    """Negative control: a peer filled with another seed's bytes under the same hashes
    (its leases' sums match what it holds) is read, and the bench's check catches it."""
    _needs("remote")
    r = _bench("remote", peer_seed=99)
    assert r.matched_by_tier.get("remote", 0) > 0
    assert r.mismatched_blocks >= r.matched_by_tier["remote"] > 0


def test_local_an_unknown_kind_is_refused_naming_it_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"--local 'gcs'.*use --local s3 or --local remote"), \
            local_chain("gcs", _opts()):
        pass


def test_local_remote_json_is_one_object_on_stdout_with_nixls_lines_on_stderr() -> None:
    """NIXL logs INFO lines to stdout; ``--json`` must still print one JSON object
    there (without the fix, json.loads fails on 'Initialized NIXL agent' lines)."""
    _needs("remote")
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "kvbm.cli", "bench", "--local", "remote", "--json", "--no-out",
         "--no-progress", "--users", "1", "--rounds", "2", "--system-tokens", "64",
         "--raw-blocks", "8", "--limit-mib", "4", "--duration", "20"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert data["paths"]["onboard:remote"]["limit_gbps"] > 0


def test_local_s3_without_moto_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from kvbm_bench import local

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "moto" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"moto is not installed.*pip install 'kvbm\[s3,test\]'"):
        local._start_s3()

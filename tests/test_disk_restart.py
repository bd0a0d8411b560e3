"""The disk tier survives a restart: blocks are found again, a write cut short is never
served, and another namespace in the same directory is kept apart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import BlockLayout, ConfigError, ContiguousBlocks, KvBlockManager, ModelSpec, Namespace
from kvbm.tier import TierContext
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE, SMALL_MODEL


def config(tmp_path: Path, model: dict[str, Any] | None = None, disk: int = 16) -> dict[str, Any]:
    return {
        "model": dict(model or SMALL_MODEL),
        "page_size": PAGE,
        "tiers": [{"type": "host", "num_blocks": 2},
                  {"type": "disk", "num_blocks": disk, "path": str(tmp_path), "admission": "all"}],
    }


def offload(m: KvBlockManager, n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    hashes = m.hash_tokens(list(range(seed * 10_000, seed * 10_000 + n * PAGE)))
    data = np.random.default_rng(seed).integers(0, 256, (n, m.block_bytes), dtype=np.uint8)
    for i in range(0, n, 2):
        m.offload(hashes[i : i + 2], ContiguousBlocks(data[i : i + 2], m.layout))
        m.flush()
    return hashes, data


def onboard(m: KvBlockManager, hashes: list[bytes]) -> tuple[int, np.ndarray, list[str]]:
    out = np.zeros((len(hashes), m.block_bytes), np.uint8)
    with m.match_prefix(hashes) as match:
        tiers = list(match.tiers)
        res = m.onboard(match, ContiguousBlocks(out[: match.num_blocks], m.layout))
    return res.loaded, out, tiers


def make_tier(tmp_path: Path, num_blocks: int = 8, **keys: Any) -> DiskTier:
    layout = BlockLayout(ModelSpec(**SMALL_MODEL), PAGE)
    ns = Namespace(SMALL_MODEL["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(tmp_path), num_blocks=num_blocks, **keys)
    return DiskTier(cfg, TierContext("disk", ns, layout, num_blocks))


def test_restarted_manager_finds_its_blocks_on_disk(tmp_path: Path) -> None:
    with KvBlockManager.from_config(config(tmp_path)) as m:
        hashes, data = offload(m, 8)
    with KvBlockManager.from_config(config(tmp_path)) as m:
        assert m.chain[1].tier.stats()["recovered_blocks"] == 8
        loaded, out, tiers = onboard(m, hashes)
        assert tiers == ["disk"] * 8 and loaded == 8 and np.array_equal(out, data)


def test_larger_capacity_after_restart_keeps_every_block(tmp_path: Path) -> None:
    with KvBlockManager.from_config(config(tmp_path, disk=8)) as m:
        hashes, data = offload(m, 8)
    with KvBlockManager.from_config(config(tmp_path, disk=32)) as m:
        loaded, out, _ = onboard(m, hashes)
        assert loaded == 8 and np.array_equal(out, data)


def test_other_namespace_in_same_directory_is_kept_apart(tmp_path: Path) -> None:
    other = {**SMALL_MODEL, "name": "another-model"}
    with KvBlockManager.from_config(config(tmp_path)) as m:
        hashes, data = offload(m, 4)
    with KvBlockManager.from_config(config(tmp_path, other)) as m2:
        assert m2.chain[1].tier.stats()["recovered_blocks"] == 0
        # Same tokens, other namespace: other keys, and none of them found.
        assert m2.match_prefix(list(range(4 * PAGE))).num_blocks == 0
        offload(m2, 4, seed=1)
    with KvBlockManager.from_config(config(tmp_path)) as m:
        loaded, out, _ = onboard(m, hashes)
        assert loaded == 4 and np.array_equal(out, data)
    assert len(list(tmp_path.glob("kvbm-*"))) == 2, "one directory per namespace"


def test_other_layout_in_same_directory_is_kept_apart(tmp_path: Path) -> None:
    with KvBlockManager.from_config(config(tmp_path)) as m:
        offload(m, 4)
    cfg = config(tmp_path, {**SMALL_MODEL, "dtype": "float16"})
    with KvBlockManager.from_config(cfg) as m2:
        assert m2.chain[1].tier.stats()["recovered_blocks"] == 0


def test_block_whose_header_was_never_written_is_not_recovered(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    bb = tier.block_bytes
    a, b = np.full(bb, 1, np.uint8), np.full(bb, 2, np.uint8)
    assert tier.write([0, 1], [b"A" * 16, b"B" * 16], [a, a]) == [True, True]
    # Cut short after the data of a new block replaced slot 1 (header not yet written):
    # the state a process killed between the two writes leaves behind.
    assert tier._write_data(1, b"C" * 16, b) is not None
    tier.close()
    tier = make_tier(tmp_path)
    try:
        assert tier.recover() == [(0, b"A" * 16)]
    finally:
        tier.close()


def test_durable_writes_are_found_after_restart(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, durable=True)
    data = [np.full(tier.block_bytes, i, np.uint8) for i in range(3)]
    keys = [bytes([65 + i]) * 16 for i in range(3)]
    assert tier.write([0, 1, 2], keys, data) == [True] * 3
    tier.close()
    tier = make_tier(tmp_path)
    try:
        assert sorted(tier.recover()) == list(zip([0, 1, 2], keys, strict=True))
    finally:
        tier.close()


def test_verify_on_recover_drops_a_corrupted_block_at_start(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    data = [np.full(tier.block_bytes, i, np.uint8) for i in range(2)]
    keys = [b"A" * 16, b"B" * 16]
    tier.write([0, 1], keys, data)
    path, off = tier.stripes[0].path, tier.geom.data_offset(1)
    tier.close()
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff")
    tier = make_tier(tmp_path, verify_on_recover=True)
    try:
        assert tier.recover() == [(0, keys[0])]
        assert tier.stats()["checksum_failures"] == 1
    finally:
        tier.close()


def test_second_tier_on_the_same_directory_and_namespace_is_refused(tmp_path: Path) -> None:
    tier = make_tier(tmp_path)
    try:
        with pytest.raises(ConfigError, match=f"in use by another kvbm tier \\(pid {os.getpid()}\\)"):
            make_tier(tmp_path)
    finally:
        tier.close()


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from kvbm import ContiguousBlocks, KvBlockManager
    cfg = {"model": {"name": "kill", "num_layers": 4, "num_kv_heads": 8, "head_dim": 128,
                     "dtype": "float16"},
           "page_size": 16,
           "tiers": [{"type": "disk", "num_blocks": 24, "path": sys.argv[1], "admission": "all",
                      "io_threads": 4}]}
    m = KvBlockManager.from_config(cfg)
    def content(key, bb):
        # Cheap to make, so the child spends its time writing: the key repeated.
        return np.frombuffer(key * (bb // 16), np.uint8)
    i = 0
    while True:
        hashes = m.hash_tokens(list(range(i * 128, i * 128 + 128)))  # 8 new blocks
        data = np.stack([content(h, m.block_bytes) for h in hashes])
        m.offload(hashes, ContiguousBlocks(data, m.layout))
        if i == 3:
            print("ready", flush=True)
        i += 1
    """
)


def test_killed_mid_offload_then_restart_serves_only_intact_blocks(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cache = tmp_path / "cache"
    rng = np.random.default_rng()
    kills = 2
    for _ in range(kills):
        p = subprocess.Popen([sys.executable, str(script), str(cache)], stdout=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready", "the child started offloading"
        time.sleep(float(rng.uniform(0.0, 0.2)))  # somewhere in the middle of a batch
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    cfg = {"model": {"name": "kill", "num_layers": 4, "num_kv_heads": 8, "head_dim": 128,
                     "dtype": "float16"},
           "page_size": 16,
           "tiers": [{"type": "disk", "num_blocks": 24, "path": str(cache), "admission": "all"}]}
    with KvBlockManager.from_config(cfg) as m:
        rt = m.chain[0]
        found = list(rt.registry.registered())
        assert found, "blocks written before the kill are found again"
        for key, _slot in found:
            out = np.zeros((1, m.block_bytes), np.uint8)
            with m.match_prefix([key]) as match:
                assert m.onboard(match, ContiguousBlocks(out, m.layout)).loaded == 1
            want = np.frombuffer(key * (m.block_bytes // 16), np.uint8)
            assert np.array_equal(out[0], want), "a recovered block is byte-exact"
        st = rt.tier.stats()
        assert st["checksum_failures"] == 0 and rt.failed_reads == 0, "no torn block was recovered"

"""Faults under the disk tier become misses or skipped writes, counted, never exceptions:
a corrupted byte, a truncated or removed file, ENOSPC, EIO."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvbm import BlockLayout, ContiguousBlocks, KvBlockManager, ModelSpec, Namespace
from kvbm.tier import TierContext
from kvbm_tiers_disk import tier as tier_module
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.format import HEADER_BYTES
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE, SMALL_MODEL


def make_tier(path: Path, num_blocks: int = 8) -> DiskTier:
    layout = BlockLayout(ModelSpec(**SMALL_MODEL), PAGE)
    ns = Namespace(SMALL_MODEL["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(path), num_blocks=num_blocks)
    return DiskTier(cfg, TierContext("disk", ns, layout, num_blocks))


def blocks(tier: DiskTier, n: int) -> tuple[list[bytes], list[np.ndarray]]:
    keys = [bytes([i + 1]) * 16 for i in range(n)]
    data = [np.random.default_rng(i).integers(0, 256, tier.block_bytes, dtype=np.uint8) for i in range(n)]
    return keys, data


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[DiskTier]:
    t = make_tier(tmp_path)
    t.recover()
    yield t
    t.close()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_data_byte_is_a_miss(tier: DiskTier) -> None:
    keys, data = blocks(tier, 2)
    assert tier.write([0, 1], keys, data) == [True, True]
    flip_byte(tier.stripes[0].path, tier.geom.data_offset(1) + 100)
    dst = [np.zeros(tier.block_bytes, np.uint8) for _ in range(2)]
    assert tier.read([0, 1], keys, dst) == [True, False]
    assert tier.stats()["checksum_failures"] == 1


def test_corrupted_data_byte_is_a_miss_through_the_manager(tmp_path: Path) -> None:
    cfg = {"model": dict(SMALL_MODEL), "page_size": PAGE,
           "tiers": [{"type": "disk", "num_blocks": 8, "path": str(tmp_path), "admission": "all"}]}
    with KvBlockManager.from_config(cfg) as m:
        hashes = m.hash_tokens(list(range(3 * PAGE)))
        data = np.random.default_rng(0).integers(0, 256, (3, m.block_bytes), dtype=np.uint8)
        m.offload(hashes, ContiguousBlocks(data, m.layout))
        tier = m.chain[0].tier
        slot = m.chain[0].registry.lookup(hashes[1])
        assert slot is not None
        flip_byte(tier.stripes[0].path, tier.geom.data_offset(slot))
        out = np.zeros_like(data)
        with m.match_prefix(hashes) as match:
            res = m.onboard(match, ContiguousBlocks(out, m.layout))
        assert (res.loaded, res.failed) == (1, [1]), "the prefix ends at the corrupted block"
        assert np.array_equal(out[0], data[0]) and not out[1].any(), "no corrupted byte handed out"


def test_corrupted_header_byte_is_not_recovered(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    keys, data = blocks(t, 3)
    t.write([0, 1, 2], keys, data)
    path, off = t.stripes[0].path, t.geom.header_offset(2) + 20
    t.close()
    flip_byte(path, off)
    t = make_tier(tmp_path)
    try:
        assert sorted(t.recover()) == [(0, keys[0]), (1, keys[1])]
    finally:
        t.close()


def test_truncated_file_is_a_miss_without_exception(tier: DiskTier) -> None:
    keys, data = blocks(tier, 4)
    tier.write([0, 1, 2, 3], keys, data)
    os.truncate(tier.stripes[0].path, tier.geom.data_offset(2) + 10)
    dst = [np.zeros(tier.block_bytes, np.uint8) for _ in range(4)]
    assert tier.read([0, 1, 2, 3], keys, dst) == [True, True, False, False]
    assert np.array_equal(dst[1], data[1])
    assert tier.stats()["short_reads"] + tier.stats()["key_mismatches"] == 2
    assert os.stat(tier.stripes[0].path).st_size == tier.stripes[0].size, "the file is extended again"
    assert tier.write([2], [keys[2]], [data[2]]) == [True], "writes go on after the truncation"


def test_removed_file_is_a_miss_and_a_new_file_is_started(tmp_path: Path) -> None:
    t = make_tier(tmp_path)
    keys, data = blocks(t, 2)
    t.write([0, 1], keys, data)
    path = t.stripes[0].path
    path.unlink()
    t.check_files()
    dst = [np.zeros(t.block_bytes, np.uint8)]
    assert t.read([0], keys[:1], dst) == [False]
    assert t.stats()["files_recreated"] == 1 and path.exists()
    assert t.write([1], keys[1:], data[1:]) == [True]
    t.close()
    t = make_tier(tmp_path)
    try:
        assert t.recover() == [(1, keys[1])], "blocks written after the removal survive a restart"
    finally:
        t.close()


def test_eio_on_read_is_a_counted_miss(tier: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    keys, data = blocks(tier, 2)
    tier.write([0, 1], keys, data)

    def failing_preadv(fd: int, bufs: list[np.ndarray], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(tier_module.os, "preadv", failing_preadv)
    dst = [np.zeros(tier.block_bytes, np.uint8) for _ in range(2)]
    assert tier.read([0, 1], keys, dst) == [False, False]
    assert (tier.stats()["eio"], tier.stats()["read_errors"]) == (2, 2)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only): a filesystem that really fills up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_is_a_counted_skipped_write(small_fs: Path) -> None:
    t = make_tier(small_fs, num_blocks=16)
    try:
        keys, data = blocks(t, 2)
        # Cut the slot file back (its reserved space returns to the filesystem), then
        # fill the filesystem: writes into the cut-off slots find no space.
        os.truncate(t.stripes[0].path, t.geom.header_offset(0) + HEADER_BYTES)
        with open(small_fs / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        t.check_files()
        assert t.write([5, 6], keys, data) == [False, False]
        assert t.stats()["enospc"] >= 2
        (small_fs / "filler").unlink()
        assert t.write([5, 6], keys, data) == [True, True], "writes resume once space is back"
    finally:
        t.close()

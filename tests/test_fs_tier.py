"""The fs tier on real files: format, publication, integrity, probe, eviction, I/O modes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import ContiguousBlocks, KvBlockManager, Namespace, build_plugins
from kvbm.blockfile import HEADER_BYTES, block_checksum, padded_bytes, unpack_header
from kvbm.errors import ConfigError
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.tier import TierContext
from kvbm_tiers_fs.config import FsTierConfig
from kvbm_tiers_fs.probe import probe_directory
from kvbm_tiers_fs.tier import FsTier

PAGE = 16
MODEL = {"name": "tiny", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float16"}
LAYOUT = BlockLayout(ModelSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16",
                               name="tiny"), PAGE)
BB = LAYOUT.bytes_per_block  # 4096: one page
# 2 layers x K,V x 16 tokens x (2 heads x 6 dims) x 2 bytes = 1536: not a page multiple.
ODD = BlockLayout(ModelSpec(num_layers=2, num_kv_heads=2, head_dim=6, dtype="float16",
                            name="odd"), PAGE)


def make_tier(path: Path, model: str = "t", layout: BlockLayout = LAYOUT, **over: Any) -> FsTier:
    """An FsTier on ``path`` for namespace ``model``, janitor thread off unless asked."""
    cfg = FsTierConfig.model_validate({"type": "fs", "name": "fs", "path": str(path),
                                       "capacity": "16MiB", "janitor": False, **over})
    ns = Namespace(model_id=model, layout_digest=layout.digest)
    return FsTier(cfg, TierContext("fs", ns, layout, cfg.resolve_num_blocks(layout.bytes_per_block)))


@contextlib.contextmanager
def tier_on(path: Path, **over: Any) -> Iterator[FsTier]:
    t = make_tier(path, **over)
    try:
        yield t
    finally:
        t.close()


def blocks(n: int, seed: int, nbytes: int = BB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, nbytes), dtype=np.uint8)


def keys(n: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed + 1000)
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(n)]


def files_of(t: FsTier, suffix: str = ".kvb") -> list[Path]:
    return sorted(p for p in t.directory.rglob(f"*{suffix}") if p.is_file())


def manager_config(path: Path, model: str = "tiny", host_blocks: int = 4, **fs: Any) -> dict[str, Any]:
    return {"model": {**MODEL, "name": model}, "page_size": PAGE,
            "tiers": [{"type": "host", "num_blocks": host_blocks},
                      {"type": "fs", "path": str(path), "capacity": "16MiB", **fs}]}


# -- plugin and config ----------------------------------------------------------------
def test_plugin_registers_fs_tier_as_shared_storage() -> None:
    entry = build_plugins().tiers.get("fs")
    assert entry.factory == "kvbm_tiers_fs.tier:FsTier" and entry.extra == "fs"
    assert entry.available and entry.load() is FsTier
    assert FsTier.shared is True and FsTier.medium == "STORAGE" and FsTier.kind == "fs"


def test_capacity_counts_each_files_header_and_padding() -> None:
    cfg = FsTierConfig.model_validate({"path": "/x", "capacity": 10 * padded_bytes(ODD.bytes_per_block)})
    assert cfg.resolve_num_blocks(ODD.bytes_per_block) == 10
    assert padded_bytes(ODD.bytes_per_block) == HEADER_BYTES + 4096


def test_missing_capacity_is_an_error_naming_the_key() -> None:
    cfg = FsTierConfig.model_validate({"name": "shared", "path": "/x"})
    with pytest.raises(ConfigError, match=r"fs tier 'shared': key 'capacity'"):
        cfg.resolve_num_blocks(BB)


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(Exception, match="fanout_levels"):
        FsTierConfig.model_validate({"path": "/x", "capacity": "1GiB", "fanout_levels": 2})


# -- the format and publication ------------------------------------------------------------
def test_written_blocks_read_back_byte_exact(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        data, ks = blocks(6, 1), keys(6, 1)
        assert t.write(list(range(6)), ks, list(data)) == [True] * 6
        out = np.zeros_like(data)
        assert t.read(list(range(6)), ks, list(out)) == [True] * 6
        assert np.array_equal(out, data)


def test_each_block_is_one_file_named_by_key_under_two_fanout_levels(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(3, 2)
        t.write([0, 1, 2], ks, list(blocks(3, 2)))
        h = ks[0].hex()
        assert (t.directory / h[:2] / h[2:4] / f"{h}.kvb").is_file()
        assert len(files_of(t)) == 3
        assert t.directory.name == f"kvbm-{t.ctx.namespace.hex}"


def test_file_carries_the_core_header_then_the_padded_block(tmp_path: Path) -> None:
    with tier_on(tmp_path, layout=ODD, model="odd") as t:
        data, ks = blocks(1, 3, ODD.bytes_per_block), keys(1, 3)
        t.write([0], ks, list(data))
        raw = (t.directory / t.path_of(ks[0])).read_bytes()
        assert len(raw) == padded_bytes(ODD.bytes_per_block)
        h = unpack_header(memoryview(raw))
        assert h is not None and h.key == ks[0] and h.length == ODD.bytes_per_block
        assert h.namespace == t.ctx.namespace.digest and h.layout == bytes.fromhex(ODD.digest)
        assert h.checksum == block_checksum(data[0])
        body = raw[HEADER_BYTES:]
        assert body[: ODD.bytes_per_block] == data[0].tobytes() and not any(body[ODD.bytes_per_block:])


def test_write_leaves_no_temporary_behind(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        t.write(list(range(4)), keys(4, 4), list(blocks(4, 4)))
        assert files_of(t, ".tmp") == []


def test_second_writer_of_a_key_keeps_the_published_file(tmp_path: Path) -> None:
    with tier_on(tmp_path) as a, tier_on(tmp_path) as b:
        ks = keys(1, 5)
        a.write([0], ks, list(blocks(1, 5)))
        f = a.directory / a.path_of(ks[0])
        inode = f.stat().st_ino
        assert b.write([7], ks, list(blocks(1, 55))) == [True]
        assert f.stat().st_ino == inode and b.stats()["put_exists"] == 1
        out = np.zeros((1, BB), np.uint8)
        assert b.read([7], ks, list(out)) == [True] and np.array_equal(out, blocks(1, 5))


@pytest.mark.parametrize("o_direct", ["auto", "off"])
@pytest.mark.parametrize("layout", [LAYOUT, ODD], ids=["page", "odd"])
def test_roundtrip_in_both_io_modes_and_block_sizes(tmp_path: Path, o_direct: str,
                                                    layout: BlockLayout) -> None:
    with tier_on(tmp_path, layout=layout, model=f"m{layout.bytes_per_block}", o_direct=o_direct) as t:
        assert t.stats()["o_direct"] is (o_direct == "auto")  # this tmp_path's filesystem takes it
        data, ks = blocks(5, 6, layout.bytes_per_block), keys(5, 6)
        assert t.write(list(range(5)), ks, list(data)) == [True] * 5
        out = np.zeros_like(data)
        assert t.read(list(range(5)), ks, list(out)) == [True] * 5
        assert np.array_equal(out, data)


def test_unaligned_destination_reads_through_a_bounce_buffer(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        data, ks = blocks(2, 7), keys(2, 7)
        t.write([0, 1], ks, list(data))
        big = np.zeros(2 * BB + 1, np.uint8)
        dst = [big[1 : 1 + BB], big[1 + BB : 1 + 2 * BB]]  # 1 byte off every page
        assert t.read([0, 1], ks, dst) == [True, True]
        assert np.array_equal(np.stack(dst), data)


def test_non_contiguous_destination_is_filled(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        data, ks = blocks(1, 8), keys(1, 8)
        t.write([0], ks, list(data))
        holder = np.zeros((BB, 2), np.uint8)
        dst = holder[:, 0]  # strided view
        assert t.read([0], ks, [dst]) == [True] and np.array_equal(dst, data[0])


# -- integrity: anything not intact is a miss --------------------------------------------------
def test_flipped_byte_fails_the_checksum_is_a_miss_and_the_file_goes(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(1, 9)
        t.write([0], ks, list(blocks(1, 9)))
        f = t.directory / t.path_of(ks[0])
        raw = bytearray(f.read_bytes())
        raw[HEADER_BYTES + 100] ^= 0x01
        f.write_bytes(bytes(raw))
        assert t.read([0], ks, [np.zeros(BB, np.uint8)]) == [False]
        st = t.stats()
        assert st["checksum_failures"] == 1 and st["bad_files_removed"] == 1 and not f.exists()


def test_file_of_another_key_under_a_name_is_a_miss(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(2, 10)
        t.write([0, 1], ks, list(blocks(2, 10)))
        a, b = (t.directory / t.path_of(k) for k in ks)
        b.write_bytes(a.read_bytes())
        assert t.read([1], [ks[1]], [np.zeros(BB, np.uint8)]) == [False]
        assert t.stats()["header_mismatches"] == 1


def test_file_of_another_layout_is_a_miss(tmp_path: Path) -> None:
    with tier_on(tmp_path, model="x") as t:
        ks = keys(1, 11)
        t.write([0], ks, list(blocks(1, 11)))
        raw = (t.directory / t.path_of(ks[0])).read_bytes()
    with tier_on(tmp_path, model="y") as other:
        f = other.directory / other.path_of(ks[0])
        f.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        f.write_bytes(raw)  # same key, other namespace: the header says so
        os.chmod(f, 0o600)
        assert other.read([0], ks, [np.zeros(BB, np.uint8)]) == [False]


def test_truncated_file_is_a_miss(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(1, 12)
        t.write([0], ks, list(blocks(1, 12)))
        f = t.directory / t.path_of(ks[0])
        os.truncate(f, HEADER_BYTES + 100)
        assert t.read([0], ks, [np.zeros(BB, np.uint8)]) == [False]
        assert t.stats()["bad_files"] == 1


def test_vanished_file_is_a_miss_not_an_error(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(2, 13)
        data = blocks(2, 13)
        t.write([0, 1], ks, list(data))
        (t.directory / t.path_of(ks[0])).unlink()
        out = np.zeros_like(data)
        assert t.read([0, 1], ks, list(out)) == [False, True]
        assert np.array_equal(out[1], data[1])
        assert t.stats()["missing_files"] == 1 and t.stats()["read_errors"] == 0


# -- probe -------------------------------------------------------------------------------
def test_probe_finds_the_leading_blocks_and_stops_at_the_first_miss(tmp_path: Path) -> None:
    with tier_on(tmp_path) as a, tier_on(tmp_path) as b:
        ks = keys(40, 14)
        a.write(list(range(30)), ks[:30], list(blocks(30, 14)))
        (a.directory / a.path_of(ks[20])).unlink()
        assert b.probe(ks) == [True] * 20 + [False] * 20


def test_probe_never_finds_a_temporary(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(1, 15)
        t.write([0], ks, list(blocks(1, 15)))
        f = t.directory / t.path_of(ks[0])
        f.rename(f.with_name(f".{ks[0].hex()}.h.1.aa.tmp"))
        assert t.probe(ks) == [False]


# -- eviction ------------------------------------------------------------------------------
def test_discard_deletes_the_files_this_instance_wrote(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(3, 16)
        t.write([0, 1, 2], ks, list(blocks(3, 16)))
        t.discard([0, 2], [ks[0], ks[2]])
        t.close()  # waits for the queued deletes
        assert [p.name for p in files_of(t)] == [f"{ks[1].hex()}.kvb"]


def test_discard_leaves_blocks_another_instance_wrote(tmp_path: Path) -> None:
    with tier_on(tmp_path) as writer, tier_on(tmp_path) as adopter:
        ks = keys(2, 17)
        writer.write([0, 1], ks, list(blocks(2, 17)))
        assert adopter.probe(ks) == [True, True]
        adopter.discard([5, 6], ks)  # its registry adopted them into slots 5 and 6
        adopter.close()
        assert len(files_of(writer)) == 2


def test_discard_of_a_slot_whose_key_moved_keeps_the_file(tmp_path: Path) -> None:
    with tier_on(tmp_path) as t:
        ks = keys(1, 18)
        t.write([0], ks, list(blocks(1, 18)))
        (t.directory / t.path_of(ks[0])).unlink()
        t.write([3], ks, list(blocks(1, 18)))  # evicted from 0, written again into 3
        t.discard([0], ks)  # the late discard of slot 0
        t.close()
        assert len(files_of(t)) == 1


def test_manager_eviction_deletes_evicted_files(tmp_path: Path) -> None:
    cfg = manager_config(tmp_path, host_blocks=2, num_blocks=4)
    mgr = KvBlockManager.from_config(cfg)
    try:
        tokens = list(range(10 * PAGE))
        hashes = mgr.hash_tokens(tokens)
        data = blocks(10, 19)
        for s in range(0, 10, 2):
            mgr.offload(hashes[s : s + 2], ContiguousBlocks(data, mgr.layout), indices=range(s, s + 2))
            mgr.flush()
    finally:
        mgr.close()
    names = {p.name for p in tmp_path.rglob("*.kvb")}
    assert names == {f"{h.hex()}.kvb" for h in hashes[6:]}


# -- through managers ------------------------------------------------------------------
def test_second_manager_onboards_the_first_ones_blocks_byte_exact(tmp_path: Path) -> None:
    cfg = manager_config(tmp_path, host_blocks=8)
    a, b = KvBlockManager.from_config(cfg), KvBlockManager.from_config(cfg)
    try:
        tokens = list(range(8 * PAGE))
        data = blocks(8, 20)
        a.offload(a.hash_tokens(tokens), ContiguousBlocks(data, a.layout))
        a.flush()
        with b.match_prefix(tokens) as m:
            assert m.tiers == ["fs"] * 8
            out = np.zeros_like(data)
            assert b.onboard(m, ContiguousBlocks(out, b.layout)).loaded == 8
        assert np.array_equal(out, data)
    finally:
        a.close()
        b.close()


def test_managers_of_another_model_never_see_the_blocks(tmp_path: Path) -> None:
    a = KvBlockManager.from_config(manager_config(tmp_path, model="m1"))
    b = KvBlockManager.from_config(manager_config(tmp_path, model="m2"))
    try:
        tokens = list(range(4 * PAGE))
        a.offload(a.hash_tokens(tokens), ContiguousBlocks(blocks(4, 21), a.layout))
        a.flush()
        with b.match_prefix(tokens) as m:
            assert m.num_blocks == 0
    finally:
        a.close()
        b.close()


# -- I/O mode detection and atime ------------------------------------------------------------
@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount (it refuses O_DIRECT); skipped where mounting is not allowed."""
    d = tmp_path / "ramfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "ramfs", "none", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here ({r.stderr.strip()})")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_o_direct_auto_falls_back_to_buffered_where_refused(ramfs: Path) -> None:
    with tier_on(ramfs) as t:
        st = t.stats()
        assert st["o_direct"] is False and "EINVAL" in st["o_direct_reason"]
        assert st["filesystem"] == "ramfs"
        data, ks = blocks(3, 22), keys(3, 22)
        t.write([0, 1, 2], ks, list(data))
        out = np.zeros_like(data)
        assert t.read([0, 1, 2], ks, list(out)) == [True] * 3 and np.array_equal(out, data)


def test_o_direct_on_where_refused_is_an_error_naming_the_fix(ramfs: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'o_direct'.*EINVAL.*o_direct: auto"):
        make_tier(ramfs, o_direct="on")


def test_probe_directory_reports_filesystem_and_io_mode(tmp_path: Path) -> None:
    p = probe_directory(str(tmp_path))
    assert p.filesystem and p.mount_point and p.o_direct_reason
    assert p.o_direct is (p.o_direct_reason == "accepted")
    assert any("O_DIRECT" in line or "buffered" in line for line in p.lines())
    assert list(tmp_path.iterdir()) == []  # its test file is gone


def test_read_sets_atime_so_the_janitor_sees_reads(tmp_path: Path) -> None:
    with tier_on(tmp_path, touch_interval_s=0) as t:
        ks = keys(1, 23)
        t.write([0], ks, list(blocks(1, 23)))
        f = t.directory / t.path_of(ks[0])
        old = time.time_ns() - 3600 * 10**9
        os.utime(f, ns=(old, old))
        assert t.read([0], ks, [np.zeros(BB, np.uint8)]) == [True]
        st = f.stat()
        assert st.st_atime_ns > old + 3000 * 10**9 and st.st_mtime_ns == old

"""The disk tier: registration, round trips through the manager, O_DIRECT switches,
space reservation and Dynamo's DYN_KVBM_DISK_* variables. Real files in tmp dirs."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import BlockLayout, ConfigError, ContiguousBlocks, KvBlockManager, ModelSpec, Namespace
from kvbm.plugins import build_plugins
from kvbm.tier import TierContext
from kvbm_tiers_disk import files
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE, SMALL_MODEL

# 2 layers x 2 x 4 tokens x 16 x float32 = 1024 bytes: not a multiple of 4096, so
# every O_DIRECT transfer goes through the tier's bounce buffers.
ODD_MODEL = dict(SMALL_MODEL)
# 2 x 2 x 4 x 128 x float32 = 8192 bytes: page-aligned staging buffers go straight to disk.
ALIGNED_MODEL = {**SMALL_MODEL, "head_dim": 64}


def disk_config(tmp_path: Path, model: dict[str, Any] = ODD_MODEL, host: int = 2,
                disk: int = 16, **disk_keys: Any) -> dict[str, Any]:
    return {
        "model": dict(model),
        "page_size": PAGE,
        "tiers": [
            {"type": "host", "num_blocks": host},
            {"type": "disk", "num_blocks": disk, "path": str(tmp_path), "admission": "all",
             **disk_keys},
        ],
    }


def offload_all(m: KvBlockManager, n: int, seed: int = 0, batch: int = 2) -> tuple[list[bytes], np.ndarray]:
    """Offload ``n`` blocks of random bytes in small batches, waiting for the cascade."""
    hashes = m.hash_tokens(list(range(seed * 10_000, seed * 10_000 + n * PAGE)))
    data = np.random.default_rng(seed).integers(0, 256, (n, m.block_bytes), dtype=np.uint8)
    for i in range(0, n, batch):
        m.offload(hashes[i : i + batch], ContiguousBlocks(data[i : i + batch], m.layout))
        m.flush()
    return hashes, data


def onboard_all(m: KvBlockManager, hashes: list[bytes]) -> tuple[int, np.ndarray, list[str]]:
    out = np.zeros((len(hashes), m.block_bytes), np.uint8)
    with m.match_prefix(hashes) as match:
        tiers = list(match.tiers)
        res = m.onboard(match, ContiguousBlocks(out[: match.num_blocks], m.layout))
    return res.loaded, out, tiers


def make_tier(tmp_path: Path, num_blocks: int = 8, model: dict[str, Any] = ODD_MODEL,
              **keys: Any) -> DiskTier:
    layout = BlockLayout(ModelSpec(**model), PAGE)
    ns = Namespace(model["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(tmp_path), num_blocks=num_blocks, **keys)
    return DiskTier(cfg, TierContext("disk", ns, layout, num_blocks))


def test_plugin_registers_disk_tier_with_frequency_admission_by_default() -> None:
    entry = build_plugins().tiers.get("disk")
    assert (entry.factory, entry.extra, entry.config_model) == (
        "kvbm_tiers_disk.tier:DiskTier", "disk", DiskTierConfig)
    assert entry.load().default_admission == "frequency"


@pytest.mark.parametrize("model", [ODD_MODEL, ALIGNED_MODEL], ids=["1KiB-blocks", "8KiB-blocks"])
def test_blocks_evicted_from_host_are_onboarded_from_disk_byte_exact(tmp_path: Path, model: dict[str, Any]) -> None:
    with KvBlockManager.from_config(disk_config(tmp_path, model)) as m:
        hashes, data = offload_all(m, 10)
        loaded, out, tiers = onboard_all(m, hashes)
        assert tiers.count("disk") >= 8, "the small host tier must have evicted most blocks"
        assert loaded == 10
        assert np.array_equal(out, data)


def test_misaligned_buffers_roundtrip_through_bounce_buffers(tmp_path: Path) -> None:
    tier = make_tier(tmp_path, model=ALIGNED_MODEL)
    try:
        bb = tier.block_bytes
        raw = np.random.default_rng(1).integers(0, 256, 3 * bb + 1, dtype=np.uint8)
        src = [raw[1 + i * bb : 1 + (i + 1) * bb] for i in range(3)]  # off by one byte
        keys = [bytes([i]) * 16 for i in range(3)]
        assert tier.write([0, 1, 2], keys, src) == [True] * 3
        back = np.zeros(3 * bb + 3, np.uint8)
        dst = [back[3 + i * bb : 3 + (i + 1) * bb] for i in range(3)]
        assert tier.read([0, 1, 2], keys, dst) == [True] * 3
        assert all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        tier.close()


@pytest.mark.parametrize("allocator", ["default", "open-direct"])
def test_slot_files_are_opened_with_o_direct(tmp_path: Path, allocator: str) -> None:
    tier = make_tier(tmp_path, allocator_type=allocator)
    try:
        assert fcntl.fcntl(tier.stripes[0].fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        tier.close()


def test_disable_o_direct_uses_buffered_io_and_still_roundtrips(tmp_path: Path) -> None:
    with KvBlockManager.from_config(disk_config(tmp_path, disable_o_direct="true")) as m:
        tier = m.chain[1].tier
        assert not fcntl.fcntl(tier.stripes[0].fd, fcntl.F_GETFL) & os.O_DIRECT
        hashes, data = offload_all(m, 6)
        loaded, out, tiers = onboard_all(m, hashes)
        assert "disk" in tiers and loaded == 6 and np.array_equal(out, data)


def _no_fallocate(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def test_zero_fill_fallback_reserves_the_file_where_fallocate_is_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "_fallocate", _no_fallocate)
    with KvBlockManager.from_config(disk_config(tmp_path, zerofill_fallback="true")) as m:
        tier = m.chain[1].tier
        st = os.stat(tier.stripes[0].path)
        assert tier.stats()["reserved_by"] == "zerofill"
        assert st.st_blocks * 512 >= st.st_size == tier.geom.file_size(16), "every byte written"
        hashes, data = offload_all(m, 6)
        loaded, out, _ = onboard_all(m, hashes)
        assert loaded == 6 and np.array_equal(out, data)


def test_unsupported_fallocate_without_zero_fill_is_refused_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "_fallocate", _no_fallocate)
    with pytest.raises(ConfigError, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK=true"):
        KvBlockManager.from_config(disk_config(tmp_path))


def test_capacity_larger_than_free_space_is_refused_with_the_figures(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    big = {**SMALL_MODEL, "num_layers": 32, "num_kv_heads": 8, "head_dim": 128}  # 1 MiB blocks
    cfg = disk_config(tmp_path, big)
    del cfg["tiers"][1]["num_blocks"]
    cfg["tiers"][1]["capacity"] = free + 2**30
    with pytest.raises(ConfigError, match=r"needs .* more on .* which has .* free; lower capacity"):
        KvBlockManager.from_config(cfg)
    assert not list(tmp_path.glob("kvbm-*/blocks-*")), "nothing was allocated"


def test_dyn_kvbm_disk_variables_configure_the_disk_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "12")
    monkeypatch.setenv("DYN_KVBM_DISK_DISABLE_O_DIRECT", "true")
    monkeypatch.setenv("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "false")
    monkeypatch.setenv("DYN_KVBM_DISK_ALLOCATOR_TYPE", "OPEN_DIRECT")
    cfg = {"model": dict(ODD_MODEL), "page_size": PAGE, "tiers": [{"type": "host", "num_blocks": 4}]}
    with KvBlockManager.from_config(cfg) as m:
        rt = m.chain[1]
        assert (rt.config.type, rt.registry.capacity) == ("disk", 12)
        st = rt.tier.stats()
        assert (st["o_direct"], st["allocator_type"]) == (False, "open-direct")
        assert st["paths"][0].startswith(str(tmp_path) + "/kvbm-")


def test_dyn_kvbm_disk_cache_gb_sets_capacity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DYN_KVBM_DISK_CACHE_GB", "0.000064")  # 64000 bytes = 62 blocks of 1 KiB
    cfg = {"model": dict(ODD_MODEL), "page_size": PAGE, "tiers": [{"type": "host", "num_blocks": 4}]}
    with KvBlockManager.from_config(cfg) as m:
        assert m.chain[1].registry.capacity == 64000 // m.block_bytes


def test_slots_are_striped_across_directories_and_found_after_restart(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    cfg = disk_config(tmp_path, path=[str(d) for d in dirs])
    with KvBlockManager.from_config(cfg) as m:
        hashes, data = offload_all(m, 8)
    assert all(list(d.glob("kvbm-*/blocks-*.kvc")) for d in dirs)
    with KvBlockManager.from_config(cfg) as m:
        loaded, out, tiers = onboard_all(m, hashes)
        assert tiers == ["disk"] * 8 and loaded == 8 and np.array_equal(out, data)


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="nixl is not installed")
def test_nixl_posix_engine_roundtrips(tmp_path: Path) -> None:
    try:
        tier = make_tier(tmp_path, model=ALIGNED_MODEL, io_engine="nixl")
    except (ImportError, ConfigError) as e:  # a nixl build without the POSIX plugin
        pytest.skip(str(e))
    try:
        bb = tier.block_bytes
        src = [np.random.default_rng(i).integers(0, 256, bb, dtype=np.uint8) for i in range(4)]
        keys = [bytes([i + 1]) * 16 for i in range(4)]
        assert tier.write([0, 1, 2, 3], keys, src) == [True] * 4
        dst = [np.zeros(bb, np.uint8) for _ in range(4)]
        assert tier.read([0, 1, 2, 3], keys, dst) == [True] * 4
        assert all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        tier.close()


# -- the checksum, computed with the GIL released ---------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=70_000), start=st.integers(0, 7))
def test_native_checksum_is_xxh3_64_of_the_same_bytes(data: bytes, start: int) -> None:
    import xxhash

    from kvbm_tiers_disk import _xxh

    buf = np.frombuffer(data, dtype=np.uint8)[min(start, len(data)):]
    assert _xxh.xxh3_64(buf) == xxhash.xxh3_64_intdigest(buf.tobytes())


def test_checksum_runs_natively_where_python_xxhash_exports_it() -> None:
    from kvbm_tiers_disk import _xxh

    # python-xxhash's extension exports XXH3_64bits on the platforms CI runs on; if
    # this fails the tier still verifies every block, only with the GIL held.
    assert _xxh.native()


def test_checksum_uses_the_simd_dispatcher_where_the_extension_exports_it() -> None:
    import ctypes

    from kvbm_tiers_disk import _xxh

    libs = _xxh._candidates()
    exported = any(hasattr(ctypes.CDLL(p), "XXH3_64bits_dispatch") for p in libs[:-1])
    if not exported:
        pytest.skip("python-xxhash's extension has no XXH3_64bits_dispatch here")
    assert _xxh.implementation().endswith(":XXH3_64bits_dispatch"), _xxh.implementation()


class _FakeLib:
    """A library whose entry points hash through python-xxhash; ``wrong`` ones add 1
    to the value of inputs longer than ``over`` bytes."""

    def __init__(self, wrong: set[str], over: int = -1) -> None:
        import ctypes

        import xxhash

        for sym in ("XXH3_64bits_dispatch", "XXH3_64bits"):
            bad = sym in wrong

            def fn(addr: int, n: int, bad: bool = bad) -> int:
                v = xxhash.xxh3_64_intdigest(ctypes.string_at(addr, n))
                return (v + 1) % 2**64 if bad and n > over else v

            setattr(self, sym, fn)


def test_an_entry_point_whose_value_differs_on_long_inputs_is_not_used() -> None:
    from kvbm_tiers_disk import _xxh

    # Wrong only past 240 bytes: XXH3's vector path, where a SIMD build could differ.
    got = _xxh._load(lambda _: _FakeLib({"XXH3_64bits_dispatch"}, over=240), ["fake"])
    assert got is not None and got[1] == "fake:XXH3_64bits"
    assert _xxh._load(lambda _: _FakeLib({"XXH3_64bits_dispatch", "XXH3_64bits"}), ["fake"]) is None
    # The control: with both right, the dispatcher is taken.
    got = _xxh._load(lambda _: _FakeLib(set()), ["fake"])
    assert got is not None and got[1] == "fake:XXH3_64bits_dispatch"

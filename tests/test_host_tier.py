"""The host tier: one page-aligned arena, pinned only where CUDA exists."""

from __future__ import annotations

import pytest

from kvbm import ConfigError, KvBlockManager

from conftest import PAGE, SMALL_MODEL

torch = pytest.importorskip("torch")


def host_manager(**tier: object) -> KvBlockManager:
    return KvBlockManager.from_config(
        {"model": SMALL_MODEL, "page_size": PAGE, "tiers": [{"type": "host", **tier}]})


def test_capacity_in_bytes_becomes_whole_blocks() -> None:
    with host_manager(capacity="1MiB") as mgr:
        assert mgr.chain[0].registry.capacity == 2**20 // mgr.block_bytes


def test_arena_is_page_aligned() -> None:
    with host_manager(num_blocks=3) as mgr:
        assert mgr.chain[0].tier.arena.ctypes.data % 4096 == 0  # type: ignore[attr-defined]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_without_cuda_auto_pinning_falls_back_to_plain_memory() -> None:
    with host_manager(num_blocks=3, pin="auto") as mgr:
        assert mgr.stats()["tiers"]["host"]["pinned"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_without_cuda_pin_always_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="key 'pin': value 'always' needs CUDA"):
        host_manager(num_blocks=3, pin="always")


@pytest.mark.gpu
def test_with_cuda_the_arena_is_pinned() -> None:
    with host_manager(num_blocks=3) as mgr:
        assert mgr.stats()["tiers"]["host"]["pinned"] is True


def test_views_alias_the_arena() -> None:
    with host_manager(num_blocks=3) as mgr:
        tier = mgr.chain[0].tier
        tier.views([2])[0][:] = 7
        assert (tier.slots[2] == 7).all()  # type: ignore[attr-defined]

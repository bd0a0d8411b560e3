"""The host tier: one page-aligned arena, pinned only where CUDA exists."""

from __future__ import annotations

import numpy as np
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


def _mapping(addr: int) -> tuple[dict[str, int], set[str]]:
    """The /proc/self/smaps sizes (kB) and VmFlags of the mapping that holds ``addr``."""
    fields: dict[str, int] = {}
    flags: set[str] = set()
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            words = line.split()
            head = words[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                flags = set(words[1:])
            elif inside and words[-1] == "kB":
                fields[head.rstrip(":")] = int(words[1])
    return fields, flags


def _resident(arr: np.ndarray) -> float:
    """The fraction of ``arr``'s 4 KiB pages present in memory (/proc/self/pagemap bit 63),
    whichever mapping they were merged into."""
    first = arr.ctypes.data // 4096
    pages = -(-(arr.ctypes.data + arr.nbytes) // 4096) - first
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read(pages * 8), dtype=np.uint64)
    return float(((entries >> np.uint64(63)) & np.uint64(1)).mean())


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the unpinned arena")
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/pagemap"), reason="Linux only")
def test_unpinned_arena_is_private_memory_faulted_in_at_start() -> None:
    # 24 MiB: whole huge pages where THP serves this mapping.
    layout_bytes = 24 * 2**20
    with host_manager(capacity=layout_bytes, touch=True) as mgr, \
            host_manager(capacity=layout_bytes, touch=False) as cold:
        arena = mgr.chain[0].tier.arena  # type: ignore[attr-defined]
        m, flags = _mapping(arena.ctypes.data)
        assert _resident(arena) == 1.0  # no page left to fault on a first copy
        assert "sh" not in flags  # private anonymous memory, not shmem
        if _thp_mode() in ("always", "madvise"):
            assert arena.ctypes.data % (2 * 2**20) == 0
            assert m["AnonHugePages"] * 1024 >= arena.nbytes // 2  # huge pages asked and got
        # Negative control: an arena with touch: false has not been faulted in.
        assert _resident(cold.chain[0].tier.arena) < 0.5  # type: ignore[attr-defined]

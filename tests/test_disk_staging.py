"""Staging buffers (``kvbm.staging``), the disk tier's O_DIRECT buffers for sources
without views: page-aligned, distinct, and on 2 MiB pages where the kernel gives them."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from kvbm.staging import HUGE_PAGE, StagingPool, huge_page_arena


def anon_huge_kib(addr: int) -> int | None:
    """AnonHugePages (KiB) of the mapping holding ``addr`` in /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "missing"
    return text.split("[")[1].split("]")[0]


def test_staging_buffers_are_page_aligned_distinct_and_the_right_size() -> None:
    pool = StagingPool(2 << 20, chunk_blocks=4)
    bufs = pool.acquire(6)
    assert all(b.nbytes == 2 << 20 and b.ctypes.data % 4096 == 0 for b in bufs)
    starts = sorted(b.ctypes.data for b in bufs)
    assert all(b - a >= 2 << 20 for a, b in zip(starts, starts[1:], strict=False)), "buffers overlap"
    for i, b in enumerate(bufs):
        b[:] = i
    assert all(int(b[0]) == i and int(b[-1]) == i for i, b in enumerate(bufs))


def test_a_huge_page_arena_is_2mib_aligned_and_zeroed() -> None:
    a = huge_page_arena(3 * HUGE_PAGE + 4096)
    assert a.ctypes.data % HUGE_PAGE == 0 and a.nbytes == 3 * HUGE_PAGE + 4096
    assert not a.any()


def test_staging_buffers_sit_on_huge_pages_where_thp_serves_madvise() -> None:
    if thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {thp_mode()!r} here")
    pool = StagingPool(2 << 20, chunk_blocks=8)
    bufs = pool.acquire(8)
    for b in bufs:
        b[:] = 1  # every page touched
    got = anon_huge_kib(bufs[0].ctypes.data)
    if not got:
        # The control: a private mapping advised here by hand. If it gets no huge page
        # either, the kernel had none to give (fragmented memory); else the pool is wrong.
        mm = mmap.mmap(-1, 8 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
        ctl = np.frombuffer(mm, np.uint8)
        ctl[:] = 1
        if not anon_huge_kib(ctl.ctypes.data):
            pytest.skip("the kernel gave no 2 MiB page to a fresh advised mapping either")
    assert got is not None and got >= 2048, f"AnonHugePages {got} KiB in the staging arena"
    assert np.all(bufs[3] == 1)

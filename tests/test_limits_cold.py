"""``ColdPairs``: limit copies that start from memory, not from the cache."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm_bench.limits import ColdPairs, copy_limits, llc_bytes


def _addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def test_a_slice_comes_round_only_after_twice_the_cache_has_passed() -> None:
    ring = ColdPairs(1 << 20, cache_bytes=3 << 20)
    like = np.zeros(1 << 20, dtype=np.uint8)
    first = _addr(ring.take(like))
    passed = 1 << 20
    for _ in range(64):
        if _addr(ring.take(like)) == first:
            break
        passed += 1 << 20
    assert 2 * (3 << 20) <= passed < 64 << 20


def test_each_limit_copy_gets_its_own_pair_shaped_as_the_callers_buffers() -> None:
    ring = ColdPairs(4 * 4096, cache_bytes=1 << 20)
    src = np.ones((4, 4096), dtype=np.uint8)
    seen: list[int] = []
    real_take = ring.take

    def take(like: np.ndarray) -> np.ndarray:
        got = real_take(like)
        assert got.shape == like.shape
        seen.append(_addr(got))
        return got

    ring.take = take  # type: ignore[method-assign]
    copy_limits(np.zeros_like(src), src, 2, None, ring)
    assert len(seen) == 8 and len(set(seen)) == 8


def test_a_copy_larger_than_the_rings_slices_is_refused_naming_the_size() -> None:
    ring = ColdPairs(4096, cache_bytes=1 << 16)
    with pytest.raises(ValueError, match="8192 bytes.*nbytes=8192"):
        ring.take(np.zeros(8192, dtype=np.uint8))


def test_the_last_level_cache_size_is_read_or_defaulted() -> None:
    assert llc_bytes() >= 2**20

"""The disk tier counts writes into never-written slot space (``fresh_writes``): a
preallocated extent's first write costs the filesystem a conversion an overwrite does
not, so ``kvbm bench`` weighs its fio limit by this count."""

from __future__ import annotations

from pathlib import Path

from disk_aligned import blocks, make_tier

from kvbm.hashing import SequenceHash


def _keys(n: int, tag: int) -> list[SequenceHash]:
    return [SequenceHash(bytes([tag, i]) * 8) for i in range(n)]


def test_a_new_tiers_first_write_of_each_slot_counts_as_fresh_and_a_rewrite_does_not(
    tmp_path: Path,
) -> None:
    t = make_tier(tmp_path, n=8)
    try:
        data = blocks(t.block_bytes, 4, seed=1)
        assert t.write([0, 1, 2, 3], _keys(4, 1), data) == [True] * 4
        assert t.stats()["fresh_writes"] == 4
        assert t.write([2, 3, 4], _keys(3, 2), data[:3]) == [True] * 3  # 2, 3 again; 4 new
        st = t.stats()
        assert (st["fresh_writes"], st["blocks_written"]) == (5, 7)
    finally:
        t.close()


def test_slots_of_a_file_reopened_from_an_earlier_run_are_not_fresh(tmp_path: Path) -> None:
    t = make_tier(tmp_path, n=8)
    t.write([0], _keys(1, 1), blocks(t.block_bytes, 1, seed=1))
    t.close()
    t = make_tier(tmp_path, n=8)  # the same file: its space may have been written
    try:
        assert t.write([5, 6], _keys(2, 3), blocks(t.block_bytes, 2, seed=2)) == [True] * 2
        assert t.stats()["fresh_writes"] == 0
    finally:
        t.close()


def test_a_failed_write_does_not_count_as_fresh(tmp_path: Path) -> None:
    t = make_tier(tmp_path, n=8)
    try:
        bad = blocks(t.block_bytes, 1, seed=1)[0][: t.block_bytes // 2]  # wrong size: refused
        assert t.write([0], _keys(1, 1), [bad]) == [False]
        assert t.stats()["fresh_writes"] == 0
    finally:
        t.close()

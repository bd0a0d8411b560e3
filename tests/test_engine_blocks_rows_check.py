"""The row copies' one-call argument check (``_native.checked_rows``): it accepts a
batch exactly when every block id and row number is in range (and, into the engine, no
block twice); anything else falls back to the numpy checks that name the value."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.engine_blocks import _native

pytestmark = pytest.mark.skipif(_native.copy_runs() is None, reason="no C compiler")

ROW = 8


def _accepts(ids: list[int], nb: int, at: list[int], nrows: int, unique: bool) -> bool:
    return (len(ids) == len(at) and all(0 <= b < nb for b in ids)
            and all(0 <= r < nrows for r in at) and not (unique and len(set(ids)) < len(ids)))


@settings(max_examples=400, deadline=None)
@given(nb=st.integers(1, 6), nrows=st.integers(1, 6), unique=st.booleans(),
       pairs=st.lists(st.tuples(st.integers(-2, 8), st.integers(-2, 8)), max_size=8))
def test_checked_rows_accepts_exactly_the_batches_in_range_without_repeats(
        nb: int, nrows: int, unique: bool, pairs: list[tuple[int, int]]) -> None:
    ids, at = [b for b, _ in pairs], [r for _, r in pairs]
    rows = np.zeros((nrows, ROW), dtype=np.uint8)
    got = _native.checked_rows(np.asarray(ids, dtype=np.int64), nb, rows, at, ROW,
                               writable=True, unique=unique)
    assert (got is not None) == _accepts(ids, nb, at, nrows, unique), (ids, at)
    if got is not None:
        assert got.dtype == np.int64 and got.tolist() == at


@pytest.mark.parametrize(("rows", "writable"), [
    (np.zeros((4, ROW + 1), np.uint8), False),        # another row size
    (np.zeros((4, ROW), np.int16).view(np.uint8)[:, :ROW], False),  # not C-contiguous
    (np.zeros((4, ROW), np.uint8), True),              # read-only, a copy out needs writes
])
def test_checked_rows_leaves_rows_it_cannot_vouch_for_to_the_full_checks(
        rows: np.ndarray, writable: bool) -> None:
    rows.flags.writeable = not writable
    assert _native.checked_rows(np.array([0, 1], np.int64), 4, rows, [0, 1], ROW,
                                writable=writable, unique=False) is None


def test_row_copies_take_the_one_call_check_and_stay_byte_exact(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_out_rows / copy_in_rows of valid arguments never reach the numpy checks, and
    move the same bytes (a wrong row or block fails the comparison)."""
    torch = pytest.importorskip("torch")
    import test_engine_blocks as eb

    from kvbm.engine_blocks import adapter

    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)

    def no_numpy_checks(*a: object, **k: object) -> None:
        raise AssertionError("the numpy checks ran")

    monkeypatch.setattr(_native, "row_numbers", no_numpy_checks)
    form = "vllm-kv-first"
    ref = eb.ref_for(form)
    blocks, _ = eb.build(form, ref)
    rows = np.zeros((6, eb.FORMS[form][0].bytes_per_block), dtype=np.uint8)
    blocks.copy_out_rows([4, 0, 5], rows, [2, 5, 0])
    for b, r in ((4, 2), (0, 5), (5, 0)):
        assert np.array_equal(rows[r], eb.block_bytes(ref, b)), (b, r)
    back, tensors = eb.build(form, torch.zeros_like(ref))
    back.copy_in_rows([1, 3, 2], rows, [2, 5, 0])
    want = torch.zeros_like(ref)
    want[1], want[3], want[2] = ref[4], ref[0], ref[5]
    assert eb.same_tensors(tensors, eb.FORMS[form][1](want))


def test_checked_rows_builds_the_loop_itself_in_a_fresh_process() -> None:
    """Its first call in a process (no copy before it) checks in C, not by falling back."""
    import subprocess
    import sys

    code = ("import numpy as np\nfrom kvbm.engine_blocks import _native\n"
            "r = _native.checked_rows(np.array([3, 1], np.int64), 4, np.zeros((2, 8), np.uint8),"
            " [1, 0], 8, writable=True, unique=True)\nassert r is not None and _native._check\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

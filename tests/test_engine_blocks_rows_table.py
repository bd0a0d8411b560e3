"""The row copies' one native call (``RunPlan.copy_rows``: ``kvbm_rows_table`` checks the
ids and rows, sorts the blocks into the engine's order and writes the address tables):
it copies exactly when the per-block path would, the same bytes to the same rows, and
nothing at all when a check fails (the per-block path then names the value)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import test_engine_blocks as eb  # noqa: E402

from kvbm.engine_blocks import _native, adapter  # noqa: E402

pytestmark = pytest.mark.skipif(_native.rows_table() is None, reason="no C compiler")

FORMS = ["vllm-kv-first", "vllm-blocks-first", "trtllm-nhd", "vllm-0.33-ratio2"]
NROWS = 6


def _plan(blocks: adapter.LayerSeparateBlocks) -> adapter._RunPlan:
    plan = blocks._run_plan()
    assert plan is not None
    return plan


def _valid(ids: list[int], at: list[int], nb: int, unique: bool) -> bool:
    return (len(ids) > 0 and all(0 <= b < nb for b in ids) and all(0 <= r < NROWS for r in at)
            and not (unique and len(set(ids)) < len(ids)))


# Mostly valid batches (ids and rows in range, in any order, repeats included); some
# with one id or row number out of range, at a random place.
def pairs_st(rows_once: bool) -> st.SearchStrategy[list[tuple[int, int]]]:
    """``rows_once``: no row named twice (an offload writes each slot once; two blocks
    into one row would leave whichever the engine order copies last)."""
    return st.lists(st.tuples(st.integers(0, eb.NB - 1), st.integers(0, NROWS - 1)),
                    max_size=8, unique_by=(lambda p: p[1]) if rows_once else None).flatmap(
        lambda p: st.one_of(st.just(p), st.builds(
            lambda i, v, row: _spoil(p, i, v, row), st.integers(0, 7),
            st.sampled_from([-1, eb.NB, NROWS + 2, 1 << 40]), st.booleans())))


def _spoil(p: list[tuple[int, int]], i: int, v: int, row: bool) -> list[tuple[int, int]]:
    if not p:
        return p
    q = list(p)
    b, r = q[i % len(q)]
    q[i % len(q)] = (b, v) if row else (v, r)
    return q


@settings(max_examples=200, deadline=None)
@given(form=st.sampled_from(FORMS), pairs=pairs_st(True), order=st.booleans())
def test_one_call_copy_out_rows_moves_each_block_to_its_row_or_nothing(
        form: str, pairs: list[tuple[int, int]], order: bool) -> None:
    adapter._NATIVE_MIN_RUN, saved = 1, adapter._NATIVE_MIN_RUN
    try:
        ref = eb.ref_for(form)
        blocks, _ = eb.build(form, ref)
    finally:
        adapter._NATIVE_MIN_RUN = saved
    ids, at = [b for b, _ in pairs], [r for _, r in pairs]
    rows = np.full((NROWS, eb.FORMS[form][0].bytes_per_block), 7, dtype=np.uint8)
    done = _plan(blocks).copy_rows(ids, rows, at, blocks.num_blocks, True, False, order)
    assert done == _valid(ids, at, blocks.num_blocks, unique=False)
    want = np.full_like(rows, 7)
    if done:
        for b, r in zip(ids, at):
            want[r] = eb.block_bytes(ref, b)
    assert np.array_equal(rows, want)


@settings(max_examples=200, deadline=None)
@given(form=st.sampled_from(FORMS), pairs=pairs_st(False), order=st.booleans())
def test_one_call_copy_in_rows_writes_exactly_the_named_blocks_or_nothing(
        form: str, pairs: list[tuple[int, int]], order: bool) -> None:
    adapter._NATIVE_MIN_RUN, saved = 1, adapter._NATIVE_MIN_RUN
    try:
        ref = eb.ref_for(form)
        blocks, tensors = eb.build(form, torch.zeros_like(ref))
    finally:
        adapter._NATIVE_MIN_RUN = saved
    ids, at = [b for b, _ in pairs], [r for _, r in pairs]
    rows = np.stack([eb.block_bytes(ref, (r + 3) % ref.shape[0]) for r in range(NROWS)])
    done = _plan(blocks).copy_rows(ids, rows, at, blocks.num_blocks, False, True, order)
    assert done == _valid(ids, at, blocks.num_blocks, unique=True)
    want = torch.zeros_like(ref)
    if done:
        for b, r in zip(ids, at):
            want[b] = ref[(r + 3) % ref.shape[0]]
    assert eb.same_tensors(tensors, eb.FORMS[form][1](want))


def test_copy_out_rows_takes_the_one_call_path_for_a_host_tiers_arguments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists of ints and a writable arena (what the executor passes) go through the one
    call: the per-block checks are never reached."""
    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)
    form = "vllm-kv-first"
    ref = eb.ref_for(form)
    blocks, _ = eb.build(form, ref)

    def per_block_path(*a: object, **k: object) -> None:
        raise AssertionError("the per-block path ran")

    monkeypatch.setattr(blocks, "_rows_args", per_block_path)
    rows = np.zeros((NROWS, eb.FORMS[form][0].bytes_per_block), dtype=np.uint8)
    blocks.copy_out_rows([4, 0, 5], rows, [2, 5, 0])
    for b, r in ((4, 2), (0, 5), (5, 0)):
        assert np.array_equal(rows[r], eb.block_bytes(ref, b)), (b, r)


def test_the_repeat_check_forgets_each_batch_even_one_it_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The one call keeps its repeat-check bytes between batches: each batch (a refused
    one included) leaves them clear, so the next batch's ids are not taken for repeats."""
    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)
    form = "vllm-kv-first"
    ref = eb.ref_for(form)
    blocks, tensors = eb.build(form, torch.zeros_like(ref))
    plan = _plan(blocks)
    rows = np.stack([eb.block_bytes(ref, b) for b in range(NROWS)])
    assert plan.copy_rows([0, 1, 2], rows, [0, 1, 2], blocks.num_blocks, False, True, True)
    assert not plan.copy_rows([3, 4, 3], rows, [3, 4, 5], blocks.num_blocks, False, True, True)
    assert plan.copy_rows([2, 3, 4, 5], rows, [2, 3, 4, 5], blocks.num_blocks, False, True, True)
    assert eb.same_tensors(tensors, eb.FORMS[form][1](ref))

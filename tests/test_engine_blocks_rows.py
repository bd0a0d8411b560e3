"""The adapter's row copies (``copy_out_rows`` / ``copy_in_rows``): engine blocks to and
from rows of one array (a host tier's arena) by row number, every form, byte-exact,
with the arguments checked as ``copy_out`` checks its own."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import test_engine_blocks as eb  # noqa: E402

from kvbm.engine_blocks import _native, adapter  # noqa: E402
from kvbm.errors import LayoutError  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test layouts' runs are a few bytes: let the native loop take them anyway."""
    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)


def _rows(form: str, n: int, fill: int) -> np.ndarray:
    return np.full((n, eb.FORMS[form][0].bytes_per_block), fill, dtype=np.uint8)


@pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])
@pytest.mark.parametrize("form", sorted(eb.FORMS))
def test_copy_out_rows_puts_each_block_in_its_row_and_touches_no_other(
        form: str, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "enabled", native)
    ref = eb.ref_for(form)
    blocks, _ = eb.build(form, ref)
    rows = _rows(form, 8, fill=7)
    ids, at = [4, 0, 5, 2], [6, 1, 3, 0]
    blocks.copy_out_rows(ids, rows, at)
    for b, r in zip(ids, at):
        assert np.array_equal(rows[r], eb.block_bytes(ref, b)), (b, r)
    for r in set(range(8)) - set(at):
        assert (rows[r] == 7).all(), r


@pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])
@pytest.mark.parametrize("form", sorted(eb.FORMS))
def test_copy_in_rows_writes_exactly_the_named_blocks_from_their_rows(
        form: str, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "enabled", native)
    ref = eb.ref_for(form)
    rows = _rows(form, 6, fill=0)
    for r, b in ((5, 0), (2, 5), (0, 2)):
        rows[r] = eb.block_bytes(ref, b)
    blocks, tensors = eb.build(form, torch.zeros_like(ref))
    blocks.copy_in_rows([3, 1, 4], rows, [5, 2, 0])
    want = torch.zeros_like(ref)
    want[3], want[1], want[4] = ref[0], ref[5], ref[2]
    assert eb.same_tensors(tensors, eb.FORMS[form][1](want))


def test_row_copies_of_one_layer_at_a_time_match_the_whole_block_copy() -> None:
    """The layer-wise table (one layer of the sorted order) lands where the whole one does."""
    form = "vllm-kv-first"
    ref = eb.ref_for(form)
    blocks, _ = eb.build(form, ref)
    ids = [5, 1, 3]
    whole = eb.bufs(len(ids), eb.FORMS[form][0], fill=0)
    blocks.copy_out(ids, whole)
    layered = eb.bufs(len(ids), eb.FORMS[form][0], fill=0)
    for li in range(blocks.num_layers):
        blocks.copy_layer_out(li, ids, layered)
    assert all(np.array_equal(a, b) for a, b in zip(whole, layered))


@pytest.mark.parametrize(("ids", "at", "match"), [
    ([0, 99], [0, 1], "block id 99 is out of range"),
    ([0, 1], [0, 6], "row 6 is out of range"),
    ([0, 1], [0], "expected 2 row numbers"),
    ([-1, 1], [0, 1], "block id -1 is out of range"),
])
def test_row_copies_refuse_a_block_or_row_out_of_range_naming_it(
        ids: list[int], at: list[int], match: str) -> None:
    form = "vllm-kv-first"
    blocks, _ = eb.build(form, eb.ref_for(form))
    with pytest.raises(LayoutError, match=match):
        blocks.copy_out_rows(ids, _rows(form, 6, 0), at)


def test_copy_in_rows_refuses_a_block_named_twice() -> None:
    form = "vllm-kv-first"
    blocks, _ = eb.build(form, eb.ref_for(form))
    with pytest.raises(LayoutError, match="block id 2 appears twice"):
        blocks.copy_in_rows([2, 0, 2], _rows(form, 6, 0), [0, 1, 2])


def test_row_copies_refuse_rows_of_another_block_size() -> None:
    form = "vllm-kv-first"
    blocks, _ = eb.build(form, eb.ref_for(form))
    rows = np.zeros((4, eb.FORMS[form][0].bytes_per_block + 1), np.uint8)
    with pytest.raises(LayoutError, match=r"rows: expected a C-contiguous uint8 array"):
        blocks.copy_out_rows([0], rows, [0])

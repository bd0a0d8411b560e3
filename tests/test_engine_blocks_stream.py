"""Streaming stores in the native copy loop: large batches skip the read-for-ownership of
each destination line. The bytes must be exactly memcpy's, whatever the alignment of
either side and whatever the run length (head and tail around the 64-byte lines)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import test_engine_blocks as eb  # noqa: E402

from kvbm.engine_blocks import _native, adapter  # noqa: E402

if _native.copy_runs() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip("no C compiler: the native copy loop is not built here", allow_module_level=True)


@pytest.fixture(autouse=True)
def restore_threshold():  # type: ignore[no-untyped-def]
    before = _native.stream_min()
    yield
    _native.set_stream_min(before)


def _runs(n: int, run: int, gap: int, dst_shift: int, src_shift: int,
          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source and destination arenas, and the run addresses (destinations in reverse order)."""
    stride = run + gap
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, n * stride + 256, dtype=np.uint8)
    dst = np.full(n * stride + 256, 0xA5, dtype=np.uint8)
    s = _native.address(src) + src_shift + np.arange(n, dtype=np.int64) * stride
    d = _native.address(dst) + dst_shift + np.arange(n, dtype=np.int64)[::-1] * stride
    return src, dst, s, np.ascontiguousarray(d)


def _expected(src: np.ndarray, n: int, run: int, gap: int, dst_shift: int,
              src_shift: int) -> np.ndarray:
    want = np.full_like(src, 0xA5)
    stride = run + gap
    for i in range(n):
        j = n - 1 - i
        want[dst_shift + j * stride: dst_shift + j * stride + run] = \
            src[src_shift + i * stride: src_shift + i * stride + run]
    return want


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 5), run=st.integers(0, 700), gap=st.integers(0, 70),
       dst_shift=st.integers(0, 127), src_shift=st.integers(0, 127), seed=st.integers(0, 99))
def test_streamed_runs_are_memcpy_byte_for_byte_at_any_alignment(
        n: int, run: int, gap: int, dst_shift: int, src_shift: int, seed: int) -> None:
    stream = _native.stream_runs()
    assert stream is not None
    src, dst, s, d = _runs(n, run, gap, dst_shift, src_shift, seed)
    stream(n, _native.address(d), _native.address(s), run)
    # The runs land where they were sent; the gaps and the margins keep their 0xA5.
    assert np.array_equal(dst, _expected(src, n, run, gap, dst_shift, src_shift))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9),
       run=st.one_of(st.sampled_from([32767, 32768, 32769, 65536 + 63, 65536 + 64, 3 * 32768 + 1]),
                     st.integers(32700, 100_000)),
       dst_shift=st.integers(0, 127), src_shift=st.integers(0, 127), seed=st.integers(0, 99))
def test_streamed_runs_cut_into_pieces_and_copied_four_at_a_time_are_memcpy_byte_for_byte(
        n: int, run: int, dst_shift: int, src_shift: int, seed: int) -> None:
    # The loop copies four pieces of at most 32 KiB at once (a run longer than that is
    # cut), a piece's head, lines and tail each its own: every count of runs around a
    # multiple of four, every length around a piece's edge, any alignment.
    stream = _native.stream_runs()
    assert stream is not None
    src, dst, s, d = _runs(n, run, 9, dst_shift, src_shift, seed)
    stream(n, _native.address(d), _native.address(s), run)
    assert np.array_equal(dst, _expected(src, n, run, 9, dst_shift, src_shift))


def test_copy_runs_streams_from_the_threshold_and_gives_the_same_bytes() -> None:
    fn = _native.copy_runs()
    assert fn is not None
    for threshold in (0, None, 10**12):  # always, never, past this batch
        _native.set_stream_min(threshold)
        assert _native.stream_min() == threshold
        src, dst, s, d = _runs(3, 4096 + 5, 13, 3, 61, seed=7)
        fn(3, _native.address(d), _native.address(s), 4096 + 5)
        assert np.array_equal(dst, _expected(src, 3, 4096 + 5, 13, 3, 61))


@pytest.mark.parametrize("form", ["vllm-kv-first", "vllm-blocks-first", "trtllm-nhd", "mla-3dim"])
def test_engine_copies_with_streaming_stores_keep_every_byte(
        form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter, "_NATIVE_MIN_RUN", 1)
    _native.set_stream_min(0)  # every call streams, however small
    ref = eb.ref_for(form)
    blocks, _ = eb.build(form, ref)
    assert blocks._run_plan() is not None
    ids = [4, 0, 5, 2]
    out = eb.bufs(len(ids), eb.FORMS[form][0], fill=7)
    blocks.copy_out(ids, out)
    for b, buf in zip(ids, out):
        assert np.array_equal(buf, eb.block_bytes(ref, b))
    back, tensors = eb.build(form, torch.zeros_like(ref))
    back.copy_in([3, 1], [eb.block_bytes(ref, 0), eb.block_bytes(ref, 5)])
    want = torch.zeros_like(ref)
    want[3], want[1] = ref[0], ref[5]
    assert eb.same_tensors(tensors, eb.FORMS[form][1](want))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_streaming_limit_copy_moves_every_byte(threads: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from kvbm_bench.limits import stream_copy

    src = np.random.default_rng(threads).integers(0, 256, (7, 4099), dtype=np.uint8)
    dst = np.zeros_like(src)
    with ThreadPoolExecutor(2) as pool:
        assert stream_copy(dst, src, threads, pool) > 0
    assert np.array_equal(dst, src)  # every row of every thread's share, none left over

"""``_native.share``: one batch's runs claimed in chunks by the calling thread and its
helpers from one counter; every run copied exactly once, a helper that starts late
claims nothing, and the manager's copies go through it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.engine_blocks import _native
from kvbm.layout import ContiguousBlocks
from kvbm.manager import KvBlockManager

if _native.copy_runs() is None:  # pragma: no cover - a machine without a C compiler
    pytest.skip("no C compiler: the native copy loop is not built here", allow_module_level=True)


def _runs(n: int, run: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source and destination arenas and address tables of n runs in shuffled order."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, n * run, dtype=np.uint8)
    dst = np.zeros(n * run, dtype=np.uint8)
    order = rng.permutation(n)
    sp = _native.address(src) + np.arange(n, dtype=np.int64) * run
    dp = _native.address(dst) + order.astype(np.int64) * run
    return src, dst, sp, dp


def _expected(src: np.ndarray, dp: np.ndarray, dst: np.ndarray, run: int) -> np.ndarray:
    want = np.zeros_like(dst)
    base = _native.address(dst)
    for i, d in enumerate(dp):
        o = int(d) - base
        want[o:o + run] = src[i * run:(i + 1) * run]
    return want


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), run=st.sampled_from([1, 63, 64, 1000, 4096, 5000]),
       chunk=st.integers(1, 9), threads=st.integers(2, 4), stream=st.booleans())
def test_shared_copy_moves_every_run_exactly_once(n: int, run: int, chunk: int, threads: int,
                                                 stream: bool) -> None:
    old_chunk, old_min = _native.SHARE_CHUNK_BYTES, _native.stream_min()
    _native.SHARE_CHUNK_BYTES = chunk * run  # chunk runs a claim: many chunks, a ragged last
    _native.set_stream_min(0 if stream else None)
    try:
        src, dst, sp, dp = _runs(n, run, n * 7 + run)
        with ThreadPoolExecutor(threads - 1) as pool, _native.share(pool, threads):
            _native.run_copy(_native.copy_runs(), n, dp, sp, run)  # type: ignore[arg-type]
        assert np.array_equal(dst, _expected(src, dp, dst, run))
    finally:
        _native.SHARE_CHUNK_BYTES = old_chunk
        _native.set_stream_min(old_min)


def test_a_helper_that_starts_after_the_batch_claims_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "SHARE_CHUNK_BYTES", 4096)
    src, dst, sp, dp = _runs(64, 4096, 1)
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(gate.wait, 10)  # the only helper is busy: the caller copies it all
        with _native.share(pool, 2):
            _native.run_copy(_native.copy_runs(), 64, dp, sp, 4096)  # type: ignore[arg-type]
        assert np.array_equal(dst, _expected(src, dp, dst, 4096))
        dst[:] = 0  # anything the late helper copied now would show
        gate.set()
        pool.submit(lambda: None).result()  # the queued helper has run by now
    assert not dst.any()


def test_without_share_a_batch_is_one_call_in_this_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_shared(*args: object) -> None:
        raise AssertionError("shared copy used outside share()")

    monkeypatch.setattr(_native, "_shared", no_shared)
    monkeypatch.setattr(_native, "SHARE_CHUNK_BYTES", 4096)
    src, dst, sp, dp = _runs(16, 4096, 2)
    _native.run_copy(_native.copy_runs(), 16, dp, sp, 4096)  # type: ignore[arg-type]
    assert np.array_equal(dst, _expected(src, dp, dst, 4096))


MODEL = {"name": "share-test", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64,
         "dtype": "bfloat16"}


def test_the_managers_copies_are_shared_across_its_copy_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Offload and onboard of contiguous blocks with copy_threads 2 go through ``share``
    (each batch several chunks) and come back byte for byte."""
    monkeypatch.setattr(_native, "SHARE_CHUNK_BYTES", 8192)
    calls: list[int] = []
    real = _native._shared
    assert real is not None

    def counting(*args: int) -> None:
        calls.append(args[-1])
        real(*args)

    monkeypatch.setattr(_native, "_shared", counting)
    with KvBlockManager.from_config({"model": MODEL, "page_size": 16, "copy_threads": 2,
                                     "tiers": [{"type": "host", "num_blocks": 32,
                                                "copy_threads": 2}]}) as mgr:
        n, bb = 16, mgr.layout.bytes_per_block
        src = np.random.default_rng(3).integers(0, 256, (n, bb), dtype=np.uint8)
        dst = np.zeros_like(src)
        hashes = mgr.hash_tokens(np.arange(n * 16, dtype=np.uint32))
        assert mgr.offload(hashes, ContiguousBlocks(src, mgr.layout)).stored == n
        with mgr.match_prefix(hashes) as m:
            assert mgr.onboard(m, ContiguousBlocks(dst, mgr.layout)).loaded == n
    assert np.array_equal(dst, src)
    assert calls.count(1) == 2  # the calling thread's share of each batch, offload and onboard


def test_the_caller_returns_only_after_every_claimed_chunk_is_copied(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two chunks of 8 MiB: the helper takes the second while the caller copies the
    first; the bytes are all there when the caller's call returns (checked at once)."""
    run = 2**20
    monkeypatch.setattr(_native, "SHARE_CHUNK_BYTES", 8 * run)
    src, dst, sp, dp = _runs(16, run, 4)
    want = _expected(src, dp, dst, run)
    with ThreadPoolExecutor(1) as pool:
        for _ in range(5):
            dst[:] = 0
            with _native.share(pool, 2):
                _native.run_copy(_native.copy_runs(), 16, dp, sp, run)  # type: ignore[arg-type]
            assert np.array_equal(dst, want)

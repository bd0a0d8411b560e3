"""The compiled chain hasher gives the Python loop's hashes, which pinned vectors fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm import BlockHasher, Namespace, TokenError, _hash_native
from kvbm import hashing as hashing_mod

NS = Namespace(model_id="m", layout_digest="abc")

needs_native = pytest.mark.skipif(_hash_native.load() is None,
                                  reason="no C compiler or no xxh3-128 symbol: Python loop only")


@contextmanager
def python_loop() -> Iterator[None]:
    """Hashers use the Python loop inside the block."""
    was = _hash_native.enabled
    _hash_native.enabled = False
    try:
        yield
    finally:
        _hash_native.enabled = was


# Hashes of the Python loop at 588ee7a (before the compiled chain): blocks written by
# older versions to disk and S3 carry these keys, so they must never change.
PINNED = [
    (4, list(range(16)), ["b880a13045c50e86090148b72fde930c", "eeeea3af479e4179c303ee93dd13d2e3",
                          "92ee692257d198313e5fd4f609ebcbd5", "1fa224be7190f323acaeba403d74986c"]),
    (16, list(range(100)), ["391d6dbc7b82f1db103c6cd67c5319b9", "8dfa51a709d5f324b52ebf117d1f8560",
                            None, None, None, "031841cb73616f83099591a67e19e2c5"]),
    (64, list(range(1000, 1256)), [None, "c9a345c777b990a09a3ac76750ed45d5", None,
                                   "e728e9127f69b55c5792efc26bc0ef77"]),
]


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize(("page", "tokens", "want"), PINNED, ids=["page4", "page16", "page64"])
def test_block_hashes_equal_the_pinned_vectors(native: bool, page: int, tokens: list[int],
                                               want: list[str | None]) -> None:
    h = BlockHasher(NS, page)
    if native:
        got = h.hash_tokens(tokens)
    else:
        with python_loop():
            got = h.hash_tokens(tokens)
    assert len(got) == len(want)
    assert [g.hex() for g, w in zip(got, want, strict=True) if w is not None] == \
        [w for w in want if w is not None]


@needs_native
def test_the_pinned_chains_take_the_compiled_chain() -> None:
    assert _hash_native.implementation().split(":")[-1].startswith("XXH3_128bits")
    assert min(len(t) // p for p, t, _ in PINNED) >= hashing_mod.NATIVE_MIN_BLOCKS


@needs_native
@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=700),
       page=st.sampled_from([1, 3, 4, 16, 28, 57, 64, 255, 300]),
       parent=st.none() | st.binary(min_size=16, max_size=16))
def test_compiled_chain_equals_python_loop(tokens: list[int], page: int,
                                           parent: bytes | None) -> None:
    h = BlockHasher(NS, page)
    got = h.hash_tokens(tokens, parent=parent)  # type: ignore[arg-type]
    with python_loop():
        want = h.hash_tokens(tokens, parent=parent)  # type: ignore[arg-type]
    assert got == want
    assert len(got) == len(tokens) // page


@pytest.mark.parametrize(("page", "tokens", "want"), PINNED, ids=["page4", "page16", "page64"])
def test_int64_ids_hash_to_the_pinned_vectors(page: int, tokens: list[int],
                                              want: list[str | None]) -> None:
    got = BlockHasher(NS, page).hash_tokens(np.array(tokens, dtype=np.int64))
    assert [g.hex() for g, w in zip(got, want, strict=True) if w is not None] == \
        [w for w in want if w is not None]


@needs_native
@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=700),
       page=st.sampled_from([1, 3, 4, 16, 57, 300]),
       parent=st.none() | st.binary(min_size=16, max_size=16),
       strided=st.booleans())
def test_compiled_chain_of_int64_ids_equals_python_loop(tokens: list[int], page: int,
                                                        parent: bytes | None,
                                                        strided: bool) -> None:
    ids = np.array(tokens, dtype=np.int64)
    if strided:  # a strided view: not C-contiguous, the general path
        ids = np.repeat(ids, 2)[::2]
    h = BlockHasher(NS, page)
    got = h.hash_tokens(ids, parent=parent)  # type: ignore[arg-type]
    with python_loop():
        want = h.hash_tokens(tokens, parent=parent)  # type: ignore[arg-type]
    assert got == want


@pytest.mark.parametrize("bad", [-1, 2**32, -(2**63)])
@pytest.mark.parametrize("where", [0, 37, 41], ids=["first", "in_a_block", "in_the_tail"])
def test_int64_id_out_of_range_is_refused_anywhere(bad: int, where: int) -> None:
    ids = np.arange(42, dtype=np.int64)  # 10 blocks of 4 and a tail of 2
    ids[where] = bad
    with pytest.raises(TokenError, match=f"min {ids.min()} and max {ids.max()}"):
        BlockHasher(NS, 4).hash_tokens(ids)


def test_load_check_refuses_an_int64_chain_that_skips_the_range_check() -> None:
    def unchecked(ids: np.ndarray, n: int, page: int, parent: bytes) -> list[bytes]:
        raw = ids.astype("<u4").tobytes()  # wraps -1 and 2**32 round instead of refusing
        return _hash_native.python_chain(raw, n, 4 * page, parent)

    assert not _hash_native._verified64(unchecked)


@needs_native
def test_a_long_chain_equals_python_loop_block_for_block() -> None:
    raw = np.random.default_rng(7).integers(0, 2**32, 8192, dtype="<u4").tobytes()
    chain = _hash_native.load()
    assert chain is not None
    assert chain(raw, 512, 64, bytes(16)) == _hash_native.python_chain(raw, 512, 64, bytes(16))


def _flipped(raw: bytes, n: int, step: int, parent: bytes) -> list[bytes]:
    """The chain with the digest's halves in the other order (low 64 bits first)."""
    out, prev = [], parent
    for i in range(n):
        prev = xxhash.xxh3_128_digest(prev + raw[i * step:(i + 1) * step])
        prev = prev[8:] + prev[:8]
        out.append(prev)
    return out


def _unchained(raw: bytes, n: int, step: int, parent: bytes) -> list[bytes]:
    """Every block hashed after ``parent``, not after the block before it."""
    return [xxhash.xxh3_128_digest(parent + raw[i * step:(i + 1) * step]) for i in range(n)]


@pytest.mark.parametrize("broken", [_flipped, _unchained], ids=["byte_order", "not_chained"])
def test_load_check_refuses_a_chain_that_differs(broken: _hash_native.ChainFn) -> None:
    # The negative controls of the property above: each mistake the C code could make
    # is caught by the load's probes, so such a chain is never used.
    assert _hash_native._verified(_hash_native.python_chain)
    assert not _hash_native._verified(broken)


def test_a_parent_not_sixteen_bytes_takes_the_python_loop() -> None:
    # The compiled chain reads 16 bytes of the parent: anything else must not reach it.
    h = BlockHasher(NS, 4)
    got = h.hash_tokens(list(range(40)), parent=b"abc")  # type: ignore[arg-type]
    assert got == _hash_native.python_chain(
        np.arange(40, dtype="<u4").tobytes(), 10, 16, b"abc")


def test_sha256_chains_ignore_the_compiled_xxh3() -> None:
    a = BlockHasher(NS, 4, "sha256").hash_tokens(list(range(40)))
    with python_loop():
        b = BlockHasher(NS, 4, "sha256").hash_tokens(list(range(40)))
    assert a == b and a[-1].hex() != BlockHasher(NS, 4).hash_tokens(list(range(40)))[-1].hex()


def test_a_library_without_the_symbols_gives_no_compiled_chain() -> None:
    assert _hash_native._find_in(["libc.so.6", "/nonexistent/lib.so"]) is None


def test_the_compiled_chain_loads_where_a_compiler_and_the_symbol_exist() -> None:
    """The tests marked ``needs_native`` skip without the compiled chain: on a machine
    with a C compiler and python-xxhash's XXH3_128bits, a chain that fails to build is
    a fault (its C no longer compiles), not a machine without it."""
    import ctypes

    from kvbm import _cc

    if _cc.compiler() is None:
        pytest.skip("no C compiler")
    exported = []
    for path in _hash_native._candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        exported += [s for s in _hash_native.SYMBOLS if hasattr(lib, s)]
    if not exported:
        pytest.skip("python-xxhash exports no XXH3_128bits here")
    assert _hash_native.load() is not None
    assert _hash_native.load64() is not None

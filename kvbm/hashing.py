"""Sequence hashes: the keys of blocks.

A block's key is a 128-bit chained hash ``h_i = H(namespace, h_{i-1}, tokens_i)``
over the block's token ids as little-endian u32 bytes, so two prompts share a key
exactly when they share every token up to and including that block, under the same
namespace. It is computed from bytes only (never Python's ``hash()``), so it is the
same in every process and after every restart.

The default ``H`` is xxh3-128: the metadata path hashes every block of every prompt,
and xxh3 does that at memory speed. ``sha256`` is offered for deployments that fear
adversarial collisions between tenants (the same concern that made vLLM move to it).
"""

from __future__ import annotations

import array
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, NewType, cast

import numpy as np
import xxhash

from . import _hash_native
from .errors import TokenError

SequenceHash = NewType("SequenceHash", bytes)
"""16 bytes naming a block and its whole prefix under one namespace.

A distinct type (not ``int``) because it is used as a dict key on the hot path, where
``bytes`` hashes once and caches, and as object names and file headers, where the raw
digest is what is stored."""

HashAlgorithm = Literal["xxh3_128", "sha256"]
_U32 = np.dtype("<u4")
_I64 = np.dtype(np.int64)


@dataclass(frozen=True)
class Namespace:
    """What must match for a block to be reused."""

    model_id: str
    layout_digest: str
    tp_rank: int = 0
    tp_size: int = 1
    lora_name: str | None = None
    cache_salt: str | None = None

    @property
    def digest(self) -> bytes:
        """16 bytes that differ whenever any field differs."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=16).digest()

    @property
    def hex(self) -> str:
        """The digest as 32 hex characters, for object keys and directory names."""
        return self.digest.hex()


def as_token_array(tokens: Any) -> np.ndarray:
    """Token ids as a 1-D ``<u4`` array; raise ``TokenError`` for anything else.

    Accepts a list of ints, a 1-D integer numpy array or a 1-D integer torch tensor.
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch.Tensor, without importing torch
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TokenError(f"tokens: expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(_U32)
    if arr.dtype.kind not in "iu":
        raise TokenError(
            f"tokens: expected integer token ids, got dtype {arr.dtype}; "
            "pass a list of ints or an integer array"
        )
    if arr.dtype != _U32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= 2**32:
            raise TokenError(f"tokens: ids must lie in [0, 2**32), got min {lo} and max {hi}")
        arr = arr.astype(_U32)
    return np.ascontiguousarray(arr)


def _token_bytes(tokens: Any) -> bytes:
    """Token ids as u32 little-endian bytes.

    Lists (what engines hand over) take ``array.array``, which converts four times
    faster than numpy and itself refuses negative, oversized and non-integer ids;
    anything it refuses goes through ``as_token_array`` for the precise error.
    """
    if isinstance(tokens, (list, tuple)) and _U32_ARRAY_OK:
        try:
            a = array.array("I", tokens)
        except (OverflowError, TypeError):
            pass
        else:
            if sys.byteorder == "big":
                a.byteswap()
            return a.tobytes()
    return as_token_array(tokens).tobytes()


_U32_ARRAY_OK = array.array("I").itemsize == 4


#: Chains this long or longer are hashed by the compiled chain (when it loaded); a
#: shorter one by the Python loop, cheaper than a ``ctypes`` call for a block or two.
NATIVE_MIN_BLOCKS = 4
_chain: _hash_native.ChainFn | None = None


def _load_chain() -> _hash_native.ChainFn | None:
    """The compiled chain (``kvbm._hash_native``), loaded at the first xxh3 hash; None
    (the Python loop below) without it, or while ``_hash_native.enabled`` is False."""
    global _chain
    fn = _hash_native.load()
    if fn is not None:
        _chain = fn
    return fn


class BlockHasher:
    """Computes the chained sequence hashes of prompts under one namespace."""

    __slots__ = ("page_size", "namespace", "algorithm", "_seed")

    def __init__(
        self, namespace: Namespace, page_size: int, algorithm: HashAlgorithm = "xxh3_128"
    ) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size: must be a positive number of tokens, got {page_size}")
        if algorithm not in ("xxh3_128", "sha256"):
            raise ValueError(f"hash_algorithm: {algorithm!r} is not one of xxh3_128, sha256")
        self.page_size = page_size
        self.namespace = namespace
        self.algorithm = algorithm
        # The namespace is the parent of the first block: blocks of two namespaces
        # never share a key, even for identical tokens.
        self._seed = namespace.digest
        if algorithm == "xxh3_128" and _chain is None:
            _load_chain()  # compiled now (~0.1 s, once a process), not in a first request

    def hash_tokens(
        self, tokens: Any, parent: SequenceHash | None = None
    ) -> list[SequenceHash]:
        """Hashes of every *complete* block of ``tokens``; a trailing partial block gets none.

        ``parent`` continues a chain (the hash of the block before ``tokens[0]``).
        """
        if type(tokens) is np.ndarray and tokens.dtype == _I64 and self.algorithm == "xxh3_128":
            got = self._hash_int64(tokens, parent)
            if got is not None:
                return got
        raw = _token_bytes(tokens)
        n = len(raw) // 4 // self.page_size
        step = self.page_size * 4
        prev: bytes = parent if parent is not None else self._seed
        # Raw digests go in; SequenceHash is a NewType, whose call per block would cost
        # a Python function call each (a third of the loop), for no runtime effect.
        out: list[bytes] = []
        append = out.append
        if self.algorithm == "xxh3_128":
            chain = (_chain if _chain is not None else _load_chain()) \
                if n >= NATIVE_MIN_BLOCKS and _hash_native.enabled else None
            if chain is not None and type(prev) is bytes and len(prev) == 16:
                return cast(list[SequenceHash], chain(raw, n, step, prev))
            digest = xxhash.xxh3_128_digest
            for i in range(n):
                prev = digest(prev + raw[i * step : (i + 1) * step])
                append(prev)
        else:
            for i in range(n):
                prev = hashlib.sha256(prev + raw[i * step : (i + 1) * step]).digest()[:16]
                append(prev)
        return cast(list[SequenceHash], out)

    def _hash_int64(self, ids: np.ndarray, parent: SequenceHash | None) -> list[SequenceHash] | None:
        """``hash_tokens`` of an int64 array by the compiled chain, which reads the ids
        as they are (no range check pass, no u32 copy); None where it does not apply
        (the general path then hashes, or names a bad id)."""
        prev = parent if parent is not None else self._seed
        n = len(ids) // self.page_size if ids.ndim == 1 else 0
        if n < NATIVE_MIN_BLOCKS or type(prev) is not bytes or len(prev) != 16 \
                or not ids.flags.c_contiguous:
            return None
        chain = _hash_native.load64()
        if chain is None:
            return None
        return cast("list[SequenceHash] | None", chain(ids, n, self.page_size, prev))


def hashes_int64() -> bool:
    """True when ``hash_tokens`` of an int64 array reads it as it is (the compiled chain
    checks the ids' range itself): callers holding int64 ids pass them unconverted."""
    return _hash_native.load64() is not None


# --- Dynamo's 64-bit scheme, for KV events read by Dynamo's router -----------------


def dynamo_block_hash(tokens: Sequence[int] | np.ndarray, seed: int = 1337) -> int:
    """xxh3-64 of the block's tokens as u32 LE bytes, seeded with the salt hash."""
    return xxhash.xxh3_64_intdigest(np.asarray(tokens, dtype=_U32).tobytes(), seed)


def dynamo_sequence_hashes(tokens: Sequence[int], page_size: int, seed: int = 1337) -> list[int]:
    """Dynamo's chained 64-bit sequence hashes of every complete block.

    The first block's sequence hash is its block hash; each later one is xxh3-64 of
    ``[parent_sequence_hash, block_hash]`` as two u64 LE, with the same seed.
    """
    arr = as_token_array(tokens)
    out: list[int] = []
    parent: int | None = None
    for i in range(len(arr) // page_size):
        bh = dynamo_block_hash(arr[i * page_size : (i + 1) * page_size], seed)
        if parent is None:
            sh = bh
        else:
            sh = xxhash.xxh3_64_intdigest(
                np.array([parent, bh], dtype="<u8").tobytes(), seed
            )
        out.append(sh)
        parent = sh
    return out

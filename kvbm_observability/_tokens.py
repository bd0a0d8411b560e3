"""The token index: each hashed block's token ids, parent and Dynamo hash, for BlockStored.

``BlockEvent`` carries only keys; ``RecordingHasher`` (installed on the manager by the
publisher) leaves every hashed prompt's blocks in a bounded ``TokenIndex``.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from kvbm.hashing import BlockHasher, SequenceHash, as_token_array

_U64_PAIR = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class KnownBlock:
    """What the token index remembers of one block."""

    parent: SequenceHash | None
    tokens: bytes  # the block's token ids, u32 little-endian
    dynamo: int | None  # Dynamo's sequence hash; None when its chain is not known
    dynamo_parent: int | None


class TokenIndex:
    """A bounded LRU map from block key to its tokens, parent and Dynamo hash.

    Fed by ``RecordingHasher`` on the request path (one dict operation per block) and
    read by the publisher's thread, hence the lock.
    """

    def __init__(self, page_size: int, capacity: int, dynamo_seed: int | None = None) -> None:
        self.page_size = page_size
        self.capacity = capacity
        self.dynamo_seed = dynamo_seed
        self._entries: OrderedDict[SequenceHash, KnownBlock] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self, tokens: np.ndarray, keys: Sequence[SequenceHash], parent: SequenceHash | None
    ) -> None:
        """Remember ``keys[i]``'s tokens (block ``i`` of ``tokens``) and parent."""
        if self.capacity <= 0 or not keys:
            return
        step = self.page_size * 4
        raw = tokens[: len(keys) * self.page_size].tobytes()
        seed = self.dynamo_seed
        entries = self._entries
        with self._lock:
            dyn: int | None = None
            if seed is not None and parent is not None:
                known = entries.get(parent)
                dyn = known.dynamo if known is not None else None
            prev = parent
            chain_known = seed is not None and (parent is None or dyn is not None)
            for i, key in enumerate(keys):
                old = entries.get(key)
                if old is not None:
                    entries.move_to_end(key)
                    prev, dyn = key, old.dynamo
                    chain_known = old.dynamo is not None
                    continue
                block = raw[i * step : (i + 1) * step]
                new_dyn: int | None = None
                if chain_known and seed is not None:
                    bh = xxhash.xxh3_64_intdigest(block, seed)
                    new_dyn = (
                        bh
                        if dyn is None
                        else xxhash.xxh3_64_intdigest(_U64_PAIR.pack(dyn, bh), seed)
                    )
                entries[key] = KnownBlock(prev, block, new_dyn, dyn)
                prev, dyn = key, new_dyn
            while len(entries) > self.capacity:
                entries.popitem(last=False)

    def lookup(self, keys: Iterable[SequenceHash]) -> list[KnownBlock | None]:
        """The entries of ``keys`` (None where unknown), without changing their age."""
        get = self._entries.get
        with self._lock:
            return [get(k) for k in keys]


class RecordingHasher(BlockHasher):
    """A ``BlockHasher`` that also leaves each hashed block's tokens in a ``TokenIndex``."""

    __slots__ = ("index",)

    def __init__(self, base: BlockHasher, index: TokenIndex) -> None:
        super().__init__(base.namespace, base.page_size, base.algorithm)
        self.index = index

    def hash_tokens(self, tokens: Any, parent: SequenceHash | None = None) -> list[SequenceHash]:
        """The base hashes; the blocks' tokens and parents are remembered as a side effect."""
        arr = as_token_array(tokens)
        keys = super().hash_tokens(arr, parent)
        self.index.record(arr, keys, parent)
        return keys

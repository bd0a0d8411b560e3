"""Object names and the metadata each block object carries.

An object holds one block, or a *pack* of up to 32 blocks written together. It is
named after its first block: ``{prefix}/{namespace hex}/{hash hex}``. Its user
metadata (returned with every GET and HEAD, ranged or not) records what it holds:

| metadata key | value |
| --- | --- |
| ``kvbm-v`` | format version, ``1`` |
| ``kvbm-ns`` | namespace digest (hex) |
| ``kvbm-layout`` | layout digest |
| ``kvbm-bb`` | bytes per block |
| ``kvbm-keys`` | the blocks' sequence hashes, hex, comma-separated, in byte order |
| ``kvbm-xxh3`` | each block's xxh3-64 checksum, hex, in the same order |

Metadata rather than an in-object header because a ranged GET of one block of a
pack then returns that block's bytes *and* its checksum in one request, and the
body is exactly the blocks, so it can be received straight into the destination.
S3 caps user metadata at 2 KiB; 32 blocks take about 1.6 KiB.

Every other block of a pack also gets a *pointer*: an empty object under the
block's own name whose metadata names the pack. A HEAD or GET of any block's name
then finds it, whichever block a probe starts at and whatever this instance's
existence cache has forgotten. A pointer carries the common keys above (one key,
one checksum: the block's) plus:

| metadata key | value |
| --- | --- |
| ``kvbm-pack`` | sequence hash (hex) of the pack's first block: the pack's name |
| ``kvbm-pos`` | the block's position in the pack |
| ``kvbm-count`` | blocks in the pack |

The block's bytes are still checked against the checksum in the pack's own
metadata, which the ranged GET of the pack returns; a pointer whose pack no longer
holds that block (and checksum) at that position is a miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from kvbm.hashing import SequenceHash

FORMAT_VERSION = "1"
MAX_PACK_BLOCKS = 32


def checksum(buf: np.ndarray) -> int:
    """xxh3-64 of a block's bytes (about 20 GB/s, so it never limits an object store)."""
    return int(xxhash.xxh3_64_intdigest(buf.data))


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What an object says it holds."""

    keys: tuple[SequenceHash, ...]
    sums: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class PackPointer:
    """What a pointer object says: block ``key`` is block ``pos`` of ``count`` in the
    pack named after ``pack``, with checksum ``sum``."""

    key: SequenceHash
    sum: int
    pack: SequenceHash
    pos: int
    count: int


class MetaCodec:
    """Encodes and checks object metadata for one namespace and layout."""

    def __init__(self, namespace_hex: str, layout_digest: str, block_bytes: int) -> None:
        self.namespace_hex = namespace_hex
        self.layout_digest = layout_digest
        self.block_bytes = block_bytes

    def encode(self, keys: list[SequenceHash], sums: list[int]) -> dict[str, str]:
        """User metadata for an object holding ``keys`` (with checksums ``sums``)."""
        return {
            "kvbm-v": FORMAT_VERSION,
            "kvbm-ns": self.namespace_hex,
            "kvbm-layout": self.layout_digest,
            "kvbm-bb": str(self.block_bytes),
            "kvbm-keys": ",".join(k.hex() for k in keys),
            "kvbm-xxh3": ",".join(f"{s:016x}" for s in sums),
        }

    def encode_pointer(
        self, key: SequenceHash, sum_: int, pack: SequenceHash, pos: int, count: int
    ) -> dict[str, str]:
        """User metadata of the pointer object for block ``pos`` of a pack."""
        return {
            **self.encode([key], [sum_]),
            "kvbm-pack": pack.hex(),
            "kvbm-pos": str(pos),
            "kvbm-count": str(count),
        }

    def decode(self, meta: dict[str, str]) -> ObjectMeta | PackPointer | str:
        """The object's contents (or the pack it points to), or a one-line reason why
        it is not ours or not intact."""
        # Servers return metadata keys in lower case; some keep the prefix casing.
        m = {k.lower(): v for k, v in meta.items()}
        if m.get("kvbm-v") != FORMAT_VERSION:
            return f"format version {m.get('kvbm-v')!r}, expected {FORMAT_VERSION!r}"
        if m.get("kvbm-ns") != self.namespace_hex:
            return "namespace digest differs"
        if m.get("kvbm-layout") != self.layout_digest:
            return f"layout digest {m.get('kvbm-layout')!r}, expected {self.layout_digest!r}"
        if m.get("kvbm-bb") != str(self.block_bytes):
            return f"block bytes {m.get('kvbm-bb')!r}, expected {self.block_bytes}"
        try:
            keys = tuple(SequenceHash(bytes.fromhex(h)) for h in m.get("kvbm-keys", "").split(","))
            sums = tuple(int(s, 16) for s in m.get("kvbm-xxh3", "").split(","))
        except ValueError:
            return "keys or checksums are not hex"
        if not keys or len(keys) != len(sums) or len(keys) > MAX_PACK_BLOCKS:
            return f"{len(keys)} keys and {len(sums)} checksums"
        if "kvbm-pack" not in m:
            return ObjectMeta(keys, sums)
        try:
            pack = SequenceHash(bytes.fromhex(m["kvbm-pack"]))
            pos, count = int(m.get("kvbm-pos", "")), int(m.get("kvbm-count", ""))
        except ValueError:
            return "pack pointer fields are not numbers or hex"
        if len(keys) != 1 or not 0 < pos < count <= MAX_PACK_BLOCKS:
            return f"pack pointer to position {pos} of {count} for {len(keys)} keys"
        return PackPointer(keys[0], sums[0], pack, pos, count)

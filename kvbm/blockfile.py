"""The header every block stored in a file carries, shared by the file-backed tiers.

A stored block is a 4096-byte header page followed by the block's bytes padded to a
multiple of 4096, so header and data each start on a boundary O_DIRECT accepts. The
disk tier puts such a pair in each slot of its preallocated files; the fs tier
writes one pair per file. The header names its block (key, namespace digest, layout
digest, length, data checksum, a sequence number and a slot) and ends with a
checksum of its own bytes, so a blank, torn or foreign header reads as None and the
block as a miss, never as data.

Field meanings the writers give ``seq`` and ``slot``: the disk tier a monotonic
sequence number and the global slot index; the fs tier the write time in
nanoseconds and 0.

Layout of the used part of the header page (little-endian)::

    magic "KVBH" | version u16 | flags u16 | key 16 B | namespace digest 16 B |
    layout digest 8 B | length u64 | data checksum u64 | seq u64 | slot u64 |
    xxh3-64 of everything before it u64

Only the standard library and xxhash here: the core imports no plugin package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

__all__ = [
    "BLOCK_MAGIC",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "HEADER_USED",
    "PAGE",
    "BlockHeader",
    "block_checksum",
    "padded_bytes",
    "pack_header",
    "round_up",
    "unpack_header",
]

#: The alignment O_DIRECT asks of offsets, lengths and buffers on common filesystems.
PAGE = 4096
#: Bytes the header takes in front of a block's data: one page, so data stays aligned.
HEADER_BYTES = PAGE
FORMAT_VERSION = 1
BLOCK_MAGIC = b"KVBH"

# magic, version, flags, key, namespace digest, layout digest, length, data checksum,
# sequence number, slot; followed by a u64 xxh3 of these bytes.
_HDR = struct.Struct("<4sHH16s16s8sQQQQ")
_SUM = struct.Struct("<Q")
#: Bytes of the header page the header actually uses (the rest is zero).
HEADER_USED = _HDR.size + _SUM.size


def round_up(n: int, align: int = PAGE) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def padded_bytes(block_bytes: int) -> int:
    """Bytes of one stored block: the header page and the data padded to a page."""
    return HEADER_BYTES + round_up(block_bytes)


def block_checksum(data: object) -> int:
    """The checksum a header records for a block's bytes (xxh3-64 of a buffer)."""
    return xxhash.xxh3_64_intdigest(data)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The record in front of each stored block's bytes."""

    key: bytes
    namespace: bytes
    layout: bytes
    length: int
    checksum: int
    seq: int
    slot: int


def pack_header(buf: memoryview, h: BlockHeader) -> None:
    """Write ``h`` into the first ``HEADER_USED`` bytes of ``buf`` (the rest stays as is)."""
    _HDR.pack_into(buf, 0, BLOCK_MAGIC, FORMAT_VERSION, 0, h.key, h.namespace, h.layout,
                   h.length, h.checksum, h.seq, h.slot)
    _SUM.pack_into(buf, _HDR.size, xxhash.xxh3_64_intdigest(buf[: _HDR.size]))


def unpack_header(buf: memoryview) -> BlockHeader | None:
    """The header in ``buf``, or None when it is blank, torn or of another format."""
    if bytes(buf[:4]) != BLOCK_MAGIC:
        return None
    (_magic, version, _flags, key, ns, layout, length, checksum, seq, slot) = _HDR.unpack_from(buf)
    if version != FORMAT_VERSION:
        return None
    if _SUM.unpack_from(buf, _HDR.size)[0] != xxhash.xxh3_64_intdigest(buf[: _HDR.size]):
        return None
    return BlockHeader(key, ns, layout, length, checksum, seq, slot)

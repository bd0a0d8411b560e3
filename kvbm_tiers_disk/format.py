"""The on-disk format of a disk tier's slot file.

One file per directory (stripe)::

    [superblock: 4096 B] [slot 0: header 4096 B | data stride] [slot 1: …] …

``stride`` is ``block_bytes`` rounded up to 4096, so every header and every data
region starts on a 4096-byte boundary as O_DIRECT requires. A slot's offset depends
only on its index, never on how many slots the file holds, so a restart with a larger
or smaller capacity keeps every slot that still fits.

A slot header (``kvbm.blockfile``, the core's block header, shared with the fs tier)
names its block (key, namespace digest, layout digest, length, data checksum,
sequence number, global slot) and ends with a checksum of its own bytes. The
writer invalidates an old header before overwriting its data, writes the data, and
writes the new header last, so at any instant a valid header describes data that was
completely written: a process killed mid-offload leaves no valid header over a torn
block. The start-up scan therefore reads only the 4 KiB headers, not the data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

# The block header (one page in front of the data) is the core's (``kvbm.blockfile``), shared
# with the fs tier; the names stay importable from here for older callers.
from kvbm.blockfile import (
    BLOCK_MAGIC,
    FORMAT_VERSION,
    HEADER_BYTES,
    HEADER_USED,
    PAGE,
    pack_header,
    round_up,
    unpack_header,
)
from kvbm.blockfile import BlockHeader as SlotHeader

__all__ = [
    "BLOCK_MAGIC", "FORMAT_VERSION", "HEADER_BYTES", "HEADER_USED", "PAGE", "SUPERBLOCK_BYTES",
    "SUPER_MAGIC", "Geometry", "SlotHeader", "Superblock", "pack_header", "round_up",
    "unpack_header",
]

SUPERBLOCK_BYTES = PAGE
SUPER_MAGIC = b"KVBMDISK"

_SUM = struct.Struct("<Q")
# magic, version, flags, namespace digest, layout digest, block bytes, stride,
# stripe index, stripe count; followed by a u64 xxh3 of these bytes.
_SUPER = struct.Struct("<8sHH16s8sQQII")


@dataclass(frozen=True)
class Geometry:
    """Where slot ``local`` of a stripe file lives, for blocks of ``block_bytes``."""

    block_bytes: int

    @property
    def stride(self) -> int:
        return round_up(self.block_bytes)

    @property
    def span(self) -> int:
        return HEADER_BYTES + self.stride

    def header_offset(self, local: int) -> int:
        return SUPERBLOCK_BYTES + local * self.span

    def data_offset(self, local: int) -> int:
        return SUPERBLOCK_BYTES + local * self.span + HEADER_BYTES

    def file_size(self, num_local: int) -> int:
        return SUPERBLOCK_BYTES + num_local * self.span

    def slots_in(self, size: int) -> int:
        """How many whole slots a file of ``size`` bytes holds."""
        return max(0, (size - SUPERBLOCK_BYTES) // self.span)


@dataclass(frozen=True)
class Superblock:
    """What a stripe file was made for; a file made for anything else is started afresh."""

    namespace: bytes
    layout: bytes
    block_bytes: int
    stride: int
    stripe: int
    num_stripes: int

    def pack(self, buf: memoryview) -> None:
        """Write the superblock into ``buf`` (``SUPERBLOCK_BYTES`` long, zeroed by the caller)."""
        _SUPER.pack_into(buf, 0, SUPER_MAGIC, FORMAT_VERSION, 0, self.namespace, self.layout,
                         self.block_bytes, self.stride, self.stripe, self.num_stripes)
        _SUM.pack_into(buf, _SUPER.size, xxhash.xxh3_64_intdigest(buf[: _SUPER.size]))

    @classmethod
    def unpack(cls, buf: memoryview) -> Superblock | None:
        """The superblock in ``buf``, or None when it is blank or damaged."""
        if bytes(buf[:8]) != SUPER_MAGIC:
            return None
        magic, version, _flags, ns, layout, bb, stride, stripe, nstripes = _SUPER.unpack_from(buf)
        if version != FORMAT_VERSION:
            return None
        if _SUM.unpack_from(buf, _SUPER.size)[0] != xxhash.xxh3_64_intdigest(buf[: _SUPER.size]):
            return None
        return cls(ns, layout, bb, stride, stripe, nstripes)

"""vLLM's KV-event wire format: event dicts and the msgpack of a batch, byte for byte.

Plain dicts in vLLM's field order: msgpack writes them exactly as msgspec writes
vLLM's tagged structs (tag first, then fields, optional ones omitted when unset).
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvbm.hashing import SequenceHash

#: vLLM's end-of-replay sequence frame: -1 as an 8-byte signed big-endian integer.
REPLAY_END_SEQ = (-1).to_bytes(8, "big", signed=True)


def int64_block_hash(key: SequenceHash) -> int:
    """A kvbm key as vLLM's integer block hash: its last 8 bytes, big-endian.

    The same rule vLLM applies to its own byte hashes, so the value fits an
    unsigned 64-bit integer and is identical in every process.
    """
    return int.from_bytes(key[-8:], "big")



def block_stored(
    block_hashes: list[Any],
    parent_block_hash: Any,
    token_ids: list[int],
    block_size: int,
    medium: str | None,
    lora_name: str | None = None,
    extra_keys: list[tuple[Any, ...] | None] | None = None,
    locality: str | None = None,
) -> dict[str, Any]:
    """A ``BlockStored`` event as vLLM encodes it."""
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": block_hashes,
        "parent_block_hash": parent_block_hash,
        "token_ids": token_ids,
        "block_size": block_size,
        "lora_id": None,
        "medium": medium,
        "lora_name": lora_name,
    }
    if extra_keys is not None:
        ev["extra_keys"] = extra_keys
    if locality is not None:
        ev["locality"] = locality
    return ev


def block_removed(
    block_hashes: list[Any], medium: str | None, locality: str | None = None
) -> dict[str, Any]:
    """A ``BlockRemoved`` event as vLLM encodes it."""
    ev: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": block_hashes, "medium": medium}
    if locality is not None:
        ev["locality"] = locality
    return ev


def all_blocks_cleared() -> dict[str, Any]:
    """An ``AllBlocksCleared`` event."""
    return {"type": "AllBlocksCleared"}


# Entries (tag + fields) each vLLM event struct can hold. msgspec sizes a struct's map
# header by that maximum, not by the fields written: beyond 15 it writes a map16
# header even for fewer entries, so the same must be done here to match its bytes.
_STRUCT_ENTRIES = {"BlockStored": 16, "BlockRemoved": 6, "AllBlocksCleared": 1}


def encode_batch(timestamp: float, events: list[dict[str, Any]], dp_rank: int | None) -> bytes:
    """msgpack of ``[timestamp, events, dp_rank]``, byte for byte as msgspec encodes vLLM's
    ``KVEventBatch`` of those events."""
    packer = msgpack.Packer(use_bin_type=True)
    parts = [
        packer.pack_array_header(3),
        packer.pack(float(timestamp)),
        packer.pack_array_header(len(events)),
    ]
    for ev in events:
        if _STRUCT_ENTRIES.get(ev.get("type", ""), 0) > 15:
            parts.append(b"\xde" + len(ev).to_bytes(2, "big"))
            for k, v in ev.items():
                parts.append(packer.pack(k))
                parts.append(packer.pack(v))
        else:
            parts.append(packer.pack(ev))
    parts.append(packer.pack(dp_rank))
    return b"".join(parts)

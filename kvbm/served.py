"""What a peer-serving tier exposes: an arena of slots and which key sits in which.

The executor keeps a ``SlotMap`` for a tier whose ``arena()`` a ``serves_peers`` tier
serves, from the operations it runs itself (in one process and in every vLLM worker
alike): ``claim`` before it writes a slot (the old key is no longer served; refused
while a peer's lease pins the slot, and that write is then skipped and reported
failed), ``commit`` once every byte of the slot is written, ``drop`` when the planner
discards the slot's block. So a peer never reads a half-written block, and bytes a
peer may be reading are never overwritten while its lease lasts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .hashing import SequenceHash


class ServedBlocks(Protocol):
    """What a ``BlockServer`` serves: an arena of slots and which key sits in which."""

    @property
    def slots(self) -> np.ndarray:
        """The arena as ``[num_slots, block_bytes]`` uint8 (registered with NIXL)."""
        ...

    def probe(self, keys: Sequence[SequenceHash]) -> list[bool]:
        """Whether each key is served now."""
        ...

    def pin(self, keys: Sequence[SequenceHash]) -> list[tuple[int, int] | None]:
        """Pin each served key's slot against overwrite: ``(slot, version)`` or None.

        ``version`` changes whenever the slot is rewritten, so a checksum remembered
        for an older version is never reported for newer bytes.
        """
        ...

    def unpin(self, slots: Sequence[int]) -> None:
        """Drop one pin of each slot (one per successful ``pin``)."""
        ...

    def keys(self) -> bytes:
        """Every served key, concatenated (the hash list a rendezvous file publishes)."""
        ...


class SlotMap:
    """The served keys of an arena that someone else's instructions fill (a vLLM worker).

    The writer brackets every write into a slot with ``claim`` (the slot's old key is
    no longer served; refused while a peer's lease pins the slot) and ``commit`` (all
    bytes are written: serve the new key). ``drop`` forgets slots whose blocks were
    discarded. Peers' leases ``pin`` slots; a pinned slot is never claimed, so bytes a
    peer may be reading are never overwritten while its lease lasts, and a slot being
    written is not mapped, so it is never served mid-write. All methods are
    thread-safe (the server's connection threads and the writer's threads).
    """

    def __init__(self, slots: np.ndarray) -> None:
        assert slots.ndim == 2 and slots.dtype == np.uint8, (
            f"a SlotMap serves a [num_slots, block_bytes] uint8 arena, got {slots.dtype}"
            f"{list(slots.shape)}"
        )
        self._slots = slots
        n = int(slots.shape[0])
        self._lock = threading.Lock()
        self._slot_of: dict[bytes, int] = {}
        self._key: list[bytes | None] = [None] * n
        self._pins = [0] * n
        self._version = [0] * n
        self.refused_claims = 0

    @property
    def slots(self) -> np.ndarray:
        return self._slots

    def _unmap(self, slot: int) -> None:
        key = self._key[slot]
        if key is not None:
            self._key[slot] = None
            if self._slot_of.get(key) == slot:
                del self._slot_of[key]

    def claim(self, slots: Sequence[int]) -> list[bool]:
        """Take ``slots`` out of service before writing them; False where a lease pins one.

        A refused slot must not be written (skip the block and report it failed): a
        peer may be reading its bytes. An accepted slot is unmapped at once, so no new
        lease can reach it until ``commit``.
        """
        out = []
        with self._lock:
            for s in slots:
                if self._pins[s]:
                    self.refused_claims += 1
                    out.append(False)
                    continue
                self._unmap(s)
                self._version[s] += 1
                out.append(True)
        return out

    def commit(self, slots: Sequence[int], keys: Sequence[bytes]) -> None:
        """All bytes of ``keys[i]`` are in ``slots[i]``: serve them from now on."""
        with self._lock:
            for s, k in zip(slots, keys):
                self._unmap(s)
                old = self._slot_of.get(k)
                if old is not None:
                    self._key[old] = None  # the same block written again elsewhere
                self._slot_of[bytes(k)] = s
                self._key[s] = bytes(k)

    def drop(self, slots: Sequence[int]) -> None:
        """Forget ``slots`` (their blocks were evicted or discarded)."""
        with self._lock:
            for s in slots:
                self._unmap(s)

    def lookup(self, key: bytes) -> int | None:
        """The slot serving ``key``, or None."""
        with self._lock:
            return self._slot_of.get(key)

    def pins_at(self, slot: int) -> int:
        """Leases holding ``slot`` now."""
        return self._pins[slot]

    def __len__(self) -> int:
        return len(self._slot_of)

    def probe(self, keys: Sequence[SequenceHash]) -> list[bool]:
        with self._lock:
            return [k in self._slot_of for k in keys]

    def pin(self, keys: Sequence[SequenceHash]) -> list[tuple[int, int] | None]:
        out: list[tuple[int, int] | None] = []
        with self._lock:
            for k in keys:
                s = self._slot_of.get(k)
                if s is None:
                    out.append(None)
                    continue
                self._pins[s] += 1
                out.append((s, self._version[s]))
        return out

    def unpin(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                assert self._pins[s] > 0, f"unpin of slot {s} that holds no lease"
                self._pins[s] -= 1

    def keys(self) -> bytes:
        with self._lock:
            return b"".join(self._slot_of)

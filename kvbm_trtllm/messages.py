"""What crosses TensorRT-LLM's ranks: plans down, reports and start-up hellos up.

- ``KvbmTrtllmMetadata``: one step's ``Plan`` (kvbm.plan); the leader returns it from
  ``build_connector_meta`` and TRT-LLM broadcasts it to every rank's worker;
- ``WorkerReport``: one rank's finished operations, ``op_id -> failed positions``;
- ``WorkerHello``: one rank's block layout (or why it refused its pool) and the blocks
  its persistent tiers recovered, sent once, when the pool is registered.

All are plain picklable objects: TRT-LLM moves the metadata with MPI, and kvbm moves
the other two with the same collectives (``kvbm_trtllm._link``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvbm.hashing import SequenceHash
from kvbm.layout import BlockLayout
from kvbm.plan import Plan, Report


@dataclass
class KvbmTrtllmMetadata:
    """One step's slot-level plan, the same for every tensor-parallel rank."""

    plan: Plan = field(default_factory=Plan)

    def __repr__(self) -> str:
        return f"KvbmTrtllmMetadata({self.plan!r})"


@dataclass
class WorkerReport:
    """What one rank's executor finished since its last report."""

    rank: int
    report: Report = field(default_factory=dict)


#: Bytes of a stored key (``SequenceHash``).
KEY_BYTES = 16


@dataclass
class WorkerHello:
    """One rank at start: its layout, or why it runs without kvbm, and its recovered blocks.

    ``recovered[t]`` holds tier ``t``'s blocks as two flat byte strings (slots as
    little-endian int64, then the 16-byte keys), so a million blocks cross as two
    buffers. ``error`` is a configuration error every rank must raise together.
    """

    rank: int
    layout: BlockLayout | None = None
    refused: str | None = None
    error: str | None = None
    recovered: list[tuple[bytes, bytes]] = field(default_factory=list)

    @staticmethod
    def encode(blocks: list[list[tuple[int, SequenceHash]]]) -> list[tuple[bytes, bytes]]:
        """Pack each tier's recovered ``(slot, key)`` pairs."""
        out = []
        for tier in blocks:
            ok = [(s, k) for s, k in tier if len(k) == KEY_BYTES]
            out.append((np.asarray([s for s, _ in ok], dtype="<i8").tobytes(),
                        b"".join(bytes(k) for _, k in ok)))
        return out

    def blocks(self, tier: int) -> set[tuple[int, SequenceHash]]:
        """(slot, key) of every block this rank recovered in tier ``tier``."""
        if tier >= len(self.recovered):
            return set()
        raw, keys = self.recovered[tier]
        slots = np.frombuffer(raw, dtype="<i8").tolist()
        return {(int(s), SequenceHash(keys[i * KEY_BYTES:(i + 1) * KEY_BYTES]))
                for i, s in enumerate(slots)}


__all__ = ["KEY_BYTES", "KvbmTrtllmMetadata", "WorkerHello", "WorkerReport"]

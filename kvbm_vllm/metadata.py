"""What crosses vLLM's process boundaries: plans down, reports up, recovered blocks at start.

- ``KvbmConnectorMetadata``: one step's ``Plan`` (kvbm.plan), the same for every
  tensor-parallel rank;
- ``KvbmWorkerMetadata``: one rank's reports, ``op_id -> (ranks reporting, failed
  positions)``; vLLM aggregates them across ranks each step;
- ``KvbmHandshakeMetadata``: one rank's blocks its persistent tiers recovered at start.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvbm.hashing import SequenceHash
from kvbm.plan import CopyOp, DiscardOp, LoadOp, Plan, ProbeOp, SaveOp


class KvbmConnectorMetadata(KVConnectorMetadata):
    """One step's slot-level plan, the same for every tensor-parallel rank."""

    def __init__(self, plan: Plan | None = None) -> None:
        self.plan = plan if plan is not None else Plan()

    @property
    def loads(self) -> list[LoadOp]:
        return self.plan.loads

    @property
    def saves(self) -> list[SaveOp]:
        return self.plan.saves

    @property
    def copies(self) -> list[CopyOp]:
        return self.plan.copies

    @property
    def discards(self) -> list[DiscardOp]:
        return self.plan.discards

    @property
    def probes(self) -> list[ProbeOp]:
        return self.plan.probes

    def __repr__(self) -> str:
        return f"KvbmConnectorMetadata({self.plan!r})"


class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """What workers finished: ``op_id -> (number of ranks reporting, failed positions)``.

    vLLM aggregates one object per rank each step; the scheduler side adds the counts
    up across steps until every rank has reported an operation.
    """

    def __init__(self, reports: dict[int, tuple[int, frozenset[int]]] | None = None) -> None:
        self.reports: dict[int, tuple[int, frozenset[int]]] = dict(reports or {})

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Sum the rank counts and unite the failures of two reports."""
        assert isinstance(other, KvbmWorkerMetadata), (
            f"KvbmWorkerMetadata cannot aggregate {type(other).__name__}"
        )
        out = dict(self.reports)
        for op, (n, failed) in other.reports.items():
            if op in out:
                m, f = out[op]
                out[op] = (m + n, f | failed)
            else:
                out[op] = (n, failed)
        return KvbmWorkerMetadata(out)

    def __repr__(self) -> str:
        return f"KvbmWorkerMetadata(ops={len(self.reports)})"


class KvbmHandshakeMetadata(KVConnectorHandshakeMetadata):
    """What one rank tells the scheduler side at start, once its KV caches are registered.

    ``physical``: the block identity of this rank's engine layout (backend, kernel,
    shape: ``config.physical_layout``), which every rank must share; ``refused``: why
    this rank cannot hold kvbm blocks (a KV-cache layout kvbm does not understand),
    which turns reuse off for the whole engine; and the blocks its persistent tiers
    found (``Tier.recover``). vLLM collects one per worker and hands them to the
    scheduler side (``set_xfer_handshake_metadata``) before the first step. Per tier:
    the slots as little-endian int64 and the 16-byte keys, concatenated, so a million
    recovered blocks cross the process boundary as two flat byte strings.
    """

    KEY_BYTES = 16

    def __init__(self, rank: int, tiers: list[tuple[bytes, bytes]], physical: str = "",
                 refused: str | None = None) -> None:
        self.rank = rank
        self.tiers = tiers
        self.physical = physical
        self.refused = refused

    @classmethod
    def of(cls, rank: int, recovered: list[list[tuple[int, SequenceHash]]],
           physical: str = "", refused: str | None = None) -> KvbmHandshakeMetadata:
        """Encode ``recovered[t]`` (slot, key) of every tier ``t``."""
        tiers = []
        for blocks in recovered:
            ok = [(s, k) for s, k in blocks if len(k) == cls.KEY_BYTES]
            slots = np.asarray([s for s, _ in ok], dtype="<i8").tobytes()
            tiers.append((slots, b"".join(k for _, k in ok)))
        return cls(rank, tiers, physical, refused)

    def blocks(self, tier: int) -> set[tuple[int, SequenceHash]]:
        """(slot, key) of every block this rank recovered in tier ``tier``."""
        if tier >= len(self.tiers):
            return set()
        slots_raw, keys = self.tiers[tier]
        slots = np.frombuffer(slots_raw, dtype="<i8").tolist()
        kb = self.KEY_BYTES
        return {(int(s), SequenceHash(keys[i * kb : (i + 1) * kb])) for i, s in enumerate(slots)}

    @property
    def num_blocks(self) -> int:
        """Blocks recovered over all tiers."""
        return sum(len(s) // 8 for s, _ in self.tiers)

    def __repr__(self) -> str:
        return (f"KvbmHandshakeMetadata(rank={self.rank}, blocks={self.num_blocks}, "
                f"physical={self.physical!r}, refused={self.refused!r})")


class KvbmConnectorStats(KVConnectorStats):
    """kvbm's counters for vLLM's stats logger: blocks loaded, failed, saved and not saved.

    The scheduler side hands one per interval (``get_kv_connector_stats``) holding
    what changed since the last; vLLM sums them (``aggregate``) and logs ``reduce()``.
    A block "not saved" found no free slot in any tier of the chain.
    """

    KEYS = ("loaded_blocks", "failed_loads", "saved_blocks", "not_saved_blocks")

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """Sum the counters of two intervals."""
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: int(self.data.get(k, 0)) for k in self.KEYS}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in self.KEYS)


def as_reports(report: dict[int, frozenset[int]]) -> dict[int, tuple[int, frozenset[int]]]:
    """One rank's executor report in the worker metadata's form (one rank each)."""
    return {op: (1, failed) for op, failed in report.items()}


__all__: list[Any] = ["KvbmConnectorMetadata", "KvbmConnectorStats", "KvbmHandshakeMetadata",
                      "KvbmWorkerMetadata", "as_reports"]

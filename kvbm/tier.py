"""The storage contract of a tier: whole blocks, addressed by slot.

The manager owns the metadata (``BlockRegistry``); a ``Tier`` only stores and returns
bytes. ``write`` and ``read`` take a batch and return one success flag per block; a
tier may also raise, and the manager turns that into a failed batch. A tier that
persists blocks (disk, s3) stores a header with each block (key, namespace digest,
layout digest, length, checksum) and reports a block whose header or checksum does
not match as a failed read, never as data.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .hashing import Namespace, SequenceHash
from .layout import BlockLayout

if TYPE_CHECKING:
    from .config import TierConfig


@dataclass(frozen=True)
class TierContext:
    """What a tier is built with besides its own config."""

    name: str
    namespace: Namespace
    layout: BlockLayout
    num_slots: int

    @property
    def block_bytes(self) -> int:
        return self.layout.bytes_per_block


class Tier(abc.ABC):
    """One storage level of the chain."""

    kind: ClassVar[str] = "tier"
    #: Blocks may appear in storage without this process writing them (another
    #: instance's S3 uploads, a peer's host tier): ``probe`` finds them.
    shared: ClassVar[bool] = False

    def __init__(self, config: TierConfig, ctx: TierContext) -> None:
        self.config = config
        self.ctx = ctx
        self.name = ctx.name
        self.num_slots = ctx.num_slots
        self.block_bytes = ctx.block_bytes

    def views(self, slots: Sequence[int]) -> list[np.ndarray] | None:
        """Writable ``uint8`` views of the slots' bytes for memory tiers, else None.

        When a tier offers views, the manager copies engine blocks straight into them
        (and out of them), sparing a staging copy.
        """
        return None

    @abc.abstractmethod
    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        """Store ``src[i]`` (``block_bytes`` each) as block ``keys[i]`` in ``slots[i]``."""

    @abc.abstractmethod
    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        """Fill ``dst[i]`` with block ``keys[i]`` from ``slots[i]``; False where it is not intact."""

    def recover(self) -> list[tuple[int, SequenceHash]]:
        """Blocks already in storage at start (a restart): (slot, key) for each intact one."""
        return []

    def probe(self, keys: Sequence[SequenceHash]) -> list[bool]:
        """For shared tiers: which keys exist in storage though the registry lacks them."""
        return [False] * len(keys)

    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        """The registry dropped these blocks (evicted or removed); forget them in storage."""

    def stats(self) -> dict[str, Any]:
        """Tier-specific counters for ``KvBlockManager.stats``."""
        return {}

    def close(self) -> None:
        """Release files, memory and connections."""

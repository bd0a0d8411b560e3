"""The storage contract of a tier: whole blocks, addressed by slot.

The planner owns the metadata (``BlockRegistry``); a ``Tier`` only stores and returns
bytes. ``write`` and ``read`` take a batch and return one success flag per block; a
tier may also raise, and the executor turns that into a failed batch. A tier that
persists blocks (disk, s3) stores a header with each block (key, namespace digest,
layout digest, length, checksum) and reports a block whose header or checksum does
not match as a failed read, never as data.

What the core must know about a tier is declared on its class, never guessed from
its type name: ``medium`` (where its blocks live, for events and metrics),
``shared`` (other instances write blocks into it), ``serves_peers`` (it exposes an
upper tier's arena to other instances), ``slot_rows()`` (its slots are rows of one array
in memory), ``peer_arena()`` (its slots are plain memory that peers may read),
``config_for_rank`` (storage that must differ per tensor-parallel
rank), ``check_chain`` (where in a chain it may stand) and ``default_admission``.
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
    from .served import ServedBlocks


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


#: Media a tier may declare, in the words of vLLM's KV events ("GPU", "CPU") and of
#: Dynamo's metrics (device, host, disk, object store, a peer).
MEDIA = ("GPU", "CPU", "DISK", "OBJECT", "REMOTE", "STORAGE")


class Tier(abc.ABC):
    """One storage level of the chain.

    Subclasses are built by the executor with ``(config, ctx)``; ``write``, ``read``,
    ``probe`` and ``discard`` may be called from several threads at once (on
    disjoint slots), so a tier guards its own shared state.
    """

    #: The tier type's display name (the registry name is what configs use).
    kind: ClassVar[str] = "tier"
    #: Where this tier's blocks live, one of ``MEDIA``: the medium of its KV events and
    #: the source label of its metrics.
    medium: ClassVar[str] = "STORAGE"
    #: Blocks may appear in storage without this process writing them (another
    #: instance's S3 uploads, a peer's host tier): ``probe`` finds them.
    shared: ClassVar[bool] = False
    #: This tier exposes an upper tier's ``peer_arena()`` to other instances (``serve``).
    serves_peers: ClassVar[bool] = False
    #: The admission filter used when the config names none (None: admit all).
    default_admission: ClassVar[str | None] = None
    #: An onboard that reads this tier's blocks straight into their promotion slots
    #: (``kvbm.staging.read_into_promotion``), or through staging buffers into an engine
    #: without views (``read_staged_parts``), splits into parts of at least this many
    #: blocks, the copy of one part into the engine overlapping the read of the next;
    #: 0 reads them as one part.
    onboard_part_blocks: ClassVar[int] = 0
    #: The write-through cascade writes this tier's blocks in parts of this many, each
    #: after the loads and saves in flight (``kvbm.foreground``: they share this
    #: machine's CPUs, memory bus and disk); 0 writes a batch as one part, never
    #: waiting (a network tier whose parts would drain its requests in flight: it
    #: calls ``kvbm.foreground.request_pause()`` before each request instead). 16:
    #: 32 MiB of 2 MiB blocks keeps a disk tier's I/O threads busy, and a load waits
    #: little for the part under way.
    cascade_part_blocks: ClassVar[int] = 16

    def __init__(self, config: TierConfig, ctx: TierContext) -> None:
        self.config = config
        self.ctx = ctx
        self.name = ctx.name
        self.num_slots = ctx.num_slots
        self.block_bytes = ctx.block_bytes

    # -- capabilities decided before any instance exists ------------------------------
    @classmethod
    def config_for_rank(cls, config: TierConfig, rank: int, tp_size: int) -> TierConfig:
        """The config tensor-parallel rank ``rank`` of ``tp_size`` builds its storage with.

        Each rank stores its own shard of every block; a tier whose storage is named
        by its config alone (a directory, a listening port) returns a config that
        differs per rank. The default (storage keyed by the namespace, which holds
        the rank) returns ``config`` unchanged.
        """
        return config

    @classmethod
    def check_chain(cls, index: int, chain: Sequence[tuple[str, type[Tier]]],
                    write_through: bool) -> None:
        """Raise ``ConfigError`` if this tier cannot stand at ``index`` of ``chain``
        ((name, tier class) of every tier, in order)."""

    # -- the data path ------------------------------------------------------------------
    def views(self, slots: Sequence[int]) -> list[np.ndarray] | None:
        """Writable ``uint8`` views of the slots' bytes for memory tiers, else None.

        When a tier offers views, the executor copies engine blocks straight into them
        (and out of them), sparing a staging copy.
        """
        return None

    def slot_rows(self) -> np.ndarray | None:
        """All slots as one C-contiguous ``[num_slots, block_bytes]`` uint8 array, slot
        ``s`` in row ``s`` (the rows ``views`` returns), for memory tiers, else None.

        When a tier offers rows, the executor copies a batch between engine blocks and
        its slots by row number, in one native call with no view per block.
        """
        return None

    def peer_arena(self) -> np.ndarray | None:
        """All slots as one ``[num_slots, block_bytes]`` uint8 array that peers may read
        (registered with NIXL by a ``serves_peers`` tier), or None."""
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
        """For shared tiers: which keys exist in storage though the registry lacks them.

        The executor bounds how long a caller waits for the answer
        (``probe_timeout_s``); a probe still running then counts as misses.
        """
        return [False] * len(keys)

    def discard(self, slots: Sequence[int], keys: Sequence[SequenceHash]) -> None:
        """The registry dropped these blocks (evicted or removed); forget them in storage.

        May run after a later write into the same slot: forget ``slots[i]`` only if it
        still holds ``keys[i]``.
        """

    def served_tier(self, candidates: Sequence[str]) -> str | None:
        """For ``serves_peers`` tiers: which of ``candidates`` (the names of the tiers whose
        ``peer_arena()`` peers could read, in chain order) to serve; None serves nothing."""
        return candidates[0] if candidates else None

    def serve(self, blocks: ServedBlocks) -> bool:
        """For ``serves_peers`` tiers: expose ``blocks`` (an arena and which key sits in
        which slot) to other instances. Returns False when the config turns serving off."""
        return False

    def stats(self) -> dict[str, Any]:
        """Tier-specific counters for ``KvBlockManager.stats``."""
        return {}

    def close(self) -> None:
        """Release files, memory and connections."""

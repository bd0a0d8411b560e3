"""The gpu tier (G1): a pool of blocks in device memory, first in a chain.

The pool is ``DeviceBlocks.allocate``: fully contiguous, so a block moves in one copy
(or through staging, per the configured strategy). On CUDA it offers no host views,
so the manager stages blocks through host buffers; on CPU (``device: auto`` without
CUDA, or ``device: cpu``) the pool is host memory and its slots are handed out as
views, like the host tier's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from kvbm.hashing import SequenceHash
from kvbm.tier import Tier, TierContext

from .blocks import DeviceBlocks
from .config import GpuTierConfig


class GpuTier(Tier):
    """Blocks in one device pool, addressed by slot (slot = block id of the pool)."""

    kind: ClassVar[str] = "gpu"
    medium: ClassVar[str] = "GPU"

    def __init__(self, config: GpuTierConfig, ctx: TierContext) -> None:
        super().__init__(config, ctx)
        self.blocks = DeviceBlocks.allocate(
            ctx.layout, ctx.num_slots, config.device, transfer=config.transfer()
        )
        self.device = self.blocks.device
        self._slots: np.ndarray | None = None
        if not self.blocks.on_cuda:
            self._slots = self.blocks.raw.numpy().reshape(self.num_slots, self.block_bytes)

    def views(self, slots: Sequence[int]) -> list[np.ndarray] | None:
        if self._slots is None:
            return None
        s = self._slots
        return [s[i] for i in slots]

    def write(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], src: Sequence[np.ndarray]
    ) -> list[bool]:
        self.blocks.copy_in(slots, src)
        return [True] * len(slots)

    def read(
        self, slots: Sequence[int], keys: Sequence[SequenceHash], dst: Sequence[np.ndarray]
    ) -> list[bool]:
        self.blocks.copy_out(slots, dst)
        return [True] * len(slots)

    def stats(self) -> dict[str, Any]:
        st = self.blocks.stats()
        st["bytes"] = self.num_slots * self.block_bytes
        return st

    def close(self) -> None:
        self.blocks.close()

"""Reusable page-aligned block buffers for copies between tiers.

Lower tiers (disk with O_DIRECT, S3) read and write through staging buffers. Carving
them from a few large anonymous mappings keeps them 4096-aligned and spares a page
fault per block per transfer; buffers return to a free list after each transfer.
"""

from __future__ import annotations

import threading

import numpy as np

from .layout import aligned_empty


class StagingPool:
    """A thread-safe free list of ``block_bytes`` aligned buffers that grows on demand."""

    def __init__(self, block_bytes: int, chunk_blocks: int = 32) -> None:
        self.block_bytes = block_bytes
        # Each buffer starts on a 4096 boundary so that O_DIRECT accepts it.
        self._stride = -(-block_bytes // 4096) * 4096
        self._chunk_blocks = chunk_blocks
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.allocated = 0

    def acquire(self, n: int) -> list[np.ndarray]:
        """``n`` buffers of ``block_bytes`` each; give them back with ``release``."""
        with self._lock:
            if len(self._free) < n:
                self._grow(max(n - len(self._free), self._chunk_blocks))
            out = self._free[-n:] if n else []
            del self._free[len(self._free) - n :]
            return out

    def release(self, bufs: list[np.ndarray]) -> None:
        with self._lock:
            self._free.extend(bufs)

    def _grow(self, n: int) -> None:
        arena = aligned_empty(n * self._stride)
        arena[::4096] = 0  # fault the pages in here, not inside the first copy into them
        for i in range(n):
            self._free.append(arena[i * self._stride : i * self._stride + self.block_bytes])
        self.allocated += n

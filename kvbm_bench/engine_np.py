"""Engine KV buffers in plain numpy, for ``kvbm bench`` where torch is not installed.

One ``uint8`` array per layer, ``[outer, num_blocks, page * heads * head_dim * itemsize]``
(vLLM's per-layer ``[2, num_blocks, page, heads, head_dim]`` viewed as bytes): a block's
bytes are spread over every layer, as in an engine, so offload gathers and onboard
scatters one run per (layer, K/V) like the torch adapter does. A block's contiguous
form is layer-major, then K/V, as ``LayerSeparateBlocks`` writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvbm.errors import LayoutError
from kvbm.layout import BlockLayout


class NumpyEngineBlocks:
    """Per-layer numpy engine buffers with ``copy_out``/``copy_in`` of whole blocks."""

    def __init__(self, layout: BlockLayout, num_blocks: int) -> None:
        m = layout.model
        self.layout = layout
        self.num_blocks = num_blocks
        self.outer = m.outer_dim
        self.run = layout.bytes_per_block // (m.num_layers * m.outer_dim)
        if self.run * m.num_layers * m.outer_dim != layout.bytes_per_block:
            raise LayoutError("numpy engine buffers: block bytes do not split per layer and K/V")
        self.layers = [np.zeros((self.outer, num_blocks, self.run), dtype=np.uint8)
                       for _ in range(m.num_layers)]

    def _check(self, indices: Sequence[int]) -> None:
        for i in indices:
            if not 0 <= i < self.num_blocks:
                raise LayoutError(f"block index {i} is out of range [0, {self.num_blocks})")

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        """Gather blocks ``indices`` into the contiguous buffers ``dst``."""
        self._check(indices)
        for i, d in zip(indices, dst):
            view = d.reshape(len(self.layers), self.outer, self.run)
            for layer, arr in enumerate(self.layers):
                np.copyto(view[layer], arr[:, i])

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        """Scatter the contiguous buffers ``src`` into blocks ``indices``."""
        self._check(indices)
        for i, s in zip(indices, src):
            view = s.reshape(len(self.layers), self.outer, self.run)
            for layer, arr in enumerate(self.layers):
                np.copyto(arr[:, i], view[layer])

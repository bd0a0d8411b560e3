"""Block movers between transformers' per-layer KV tensors and kvbm's block bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvbm.errors import LayoutError
from kvbm.layout import BlockLayout


class CacheBlockSource:
    """A ``BlockSource`` over per-layer ``[1, kv_heads, seq, head_dim]`` key/value tensors.

    Block ``b`` is tokens ``b*page .. (b+1)*page``. ``copy_out`` gathers it from every
    layer into kvbm's ``(num_layers, 2, page, kv_heads*head_dim)`` block bytes.
    The tensors are held by reference: transformers' ``DynamicLayer`` replaces them on
    every update, and ``KvbmLayer`` writes only past the tokens it handed out, so a
    source stays valid while the model runs on (which is what lets
    ``KvbmCache.offload_blocks(wait=False)`` copy in the background).
    """

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], layout: BlockLayout,
                 batch_index: int = 0) -> None:
        m = layout.model
        if len(layers) != m.num_layers:
            raise LayoutError(f"cache: expected {m.num_layers} layers, got {len(layers)}")
        want = getattr(torch, m.dtype)
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for li, (k, v) in enumerate(layers):
            for what, t in (("keys", k), ("values", v)):
                if t.dim() != 4 or t.shape[1] != m.num_kv_heads or t.shape[3] != m.head_dim:
                    raise LayoutError(
                        f"cache layer {li} {what}: expected [batch, {m.num_kv_heads}, seq, "
                        f"{m.head_dim}], got {list(t.shape)}"
                    )
                if t.dtype != want:
                    raise LayoutError(f"cache layer {li} {what}: expected {m.dtype}, got {t.dtype}")
            self._kv.append((k[batch_index], v[batch_index]))
        self.num_tokens = min(min(k.shape[1], v.shape[1]) for k, v in self._kv)
        self.num_blocks = self.num_tokens // layout.page_size
        self.layout = layout
        self._dtype = want

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        """Gather blocks ``indices`` into ``dst`` (one kvbm block's bytes each)."""
        with torch.inference_mode():
            self._copy_out(indices, dst)

    def _copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        m = self.layout.model
        p = self.layout.page_size
        for b, d in zip(indices, dst, strict=True):
            if not 0 <= b < self.num_blocks:
                raise LayoutError(f"block index {b} is out of range [0, {self.num_blocks})")
            out = torch.from_numpy(d).view(self._dtype).view(
                m.num_layers, 2, p, m.num_kv_heads, m.head_dim
            )
            s = b * p
            for li, (k, v) in enumerate(self._kv):
                # [heads, page, head_dim] -> [page, heads, head_dim]: one strided copy each.
                out[li, 0].copy_(k[:, s : s + p].transpose(0, 1))
                out[li, 1].copy_(v[:, s : s + p].transpose(0, 1))


class CacheBlockDestination:
    """A ``BlockDestination`` that writes onboarded blocks where the model will read them.

    It allocates every layer's keys and values in one tensor ``[L, 2, 1, capacity,
    kv_heads, head_dim]``, ``capacity`` tokens long: room for the loaded prefix, the
    rest of the prompt and some generated tokens. Token-major, like kvbm's block (and
    like the projections transformers computes K and V with), so ``copy_in`` lands a
    block with one copy of ``L × 2`` contiguous runs, and ``kv_room`` hands the model
    ``[1, kv_heads, capacity, head_dim]`` views of it (attention reads strided K/V at
    the same speed). ``KvbmLayer`` then appends the new tokens' KV into the remaining
    room, so the prefix's bytes are copied once, from the tier into place, where a plain
    ``DynamicCache`` would copy them again on every forward (``torch.cat``).
    """

    def __init__(self, layout: BlockLayout, num_blocks: int, capacity: int,
                 device: Any = "cpu") -> None:
        m = layout.model
        if capacity < num_blocks * layout.page_size:
            raise ValueError(f"capacity {capacity} tokens is less than {num_blocks} blocks")
        self.layout = layout
        self.num_blocks = num_blocks
        self._dtype = getattr(torch, m.dtype)
        self.room = torch.empty(
            (m.num_layers, 2, 1, capacity, m.num_kv_heads, m.head_dim),
            dtype=self._dtype, device=device,
        )

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        """Write kvbm blocks ``src`` into the room as blocks ``indices`` of the prefix."""
        # The manager may call from its copy threads, where the caller's inference mode
        # (thread-local) is off; updating an inference tensor there would raise.
        with torch.inference_mode():
            self._copy_in(indices, src)

    def _copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        m = self.layout.model
        p = self.layout.page_size
        for b, s in zip(indices, src, strict=True):
            if not 0 <= b < self.num_blocks:
                raise LayoutError(f"block index {b} is out of range [0, {self.num_blocks})")
            blk = torch.from_numpy(s).view(self._dtype).view(
                m.num_layers, 2, p, m.num_kv_heads, m.head_dim
            )
            self.room[:, :, 0, b * p : (b + 1) * p].copy_(blk)

    def kv_room(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s key and value room as ``[1, kv_heads, capacity, head_dim]`` views."""
        return self.room[layer, 0].transpose(1, 2), self.room[layer, 1].transpose(1, 2)

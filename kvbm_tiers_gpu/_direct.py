"""The ``direct`` strategy: gather on the device in host order, then one DMA per block.

``gather`` stages a batch layer-major (``[layers, blocks, ...]``) and the host then
scatters each block's layers into its own buffer: a CPU copy of every byte, which on
CUDA runs slower than PCIe. ``direct`` gathers into a device buffer in the host
buffers' own order (``[blocks, layers, ...]``: each block's bytes contiguous, as its
host buffer holds them), so each block's bytes go straight between that buffer and
its host buffer in one copy (DMA from pinned memory on CUDA), with no host-side copy.
Blocks whose host buffers lie back to back (adjacent slots of one arena) share one
copy. Onboard is the reverse: one copy per block (or run of adjacent blocks) into the
device buffer, then an ``index_copy_`` per layer into the engine's tensors.

One device buffer serves a whole batch, piece by piece: every step of every piece runs
on the direction's own stream, in order, so a piece's gather cannot overwrite bytes the
previous piece's copy still reads. Layer-wise onboard keeps ``gather`` (its point is
a copy per layer, which ``direct`` does not make). A fully contiguous pool needs
neither: its blocks go by ``per_block``'s one copy per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._gather import _index, _scatter

if TYPE_CHECKING:
    from .blocks import DeviceBlocks


def _device_buffer(blocks: DeviceBlocks, nbytes: int) -> Any:
    """The adapter's device buffer of at least ``nbytes`` (made once, grown if needed)."""
    buf = blocks._direct_buf
    if buf is None or buf.numel() < nbytes:
        torch = blocks._torch
        buf = torch.empty(nbytes, dtype=torch.uint8, device=blocks.device)
        blocks._direct_buf = buf
    return buf


def _addr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _coalesced(hosts: list[np.ndarray]) -> list[tuple[int, int]]:
    """``[j0, j1)`` spans of ``hosts`` to copy as one.

    A span's buffers are views of one array (the same ``base``: adjacent slots of an
    arena) lying back to back in memory, so the bytes from the first's start to the
    last's end are all that array's. Any other buffer is a span of its own.
    """
    spans: list[tuple[int, int]] = []
    j0 = 0
    for j in range(1, len(hosts) + 1):
        if j < len(hosts):
            prev, cur = hosts[j - 1], hosts[j]
            if (cur.base is not None and cur.base is prev.base
                    and _addr(cur) == _addr(prev) + prev.nbytes):
                continue
        spans.append((j0, j))
        j0 = j
    return spans


def _span(hosts: list[np.ndarray], j0: int, j1: int) -> np.ndarray:
    """The bytes of ``hosts[j0:j1]`` (one span of ``_coalesced``) as one byte array."""
    first = hosts[j0]
    if j1 - j0 == 1:
        return first
    n = sum(h.nbytes for h in hosts[j0:j1])
    # Inside the array the span's buffers are views of (see _coalesced).
    return np.lib.stride_tricks.as_strided(first, shape=(n,), strides=(1,))


def _host_parts(blocks: DeviceBlocks, bufs: list[np.ndarray], l0: int, l1: int) -> list[np.ndarray]:
    """Each buffer's layers ``[l0, l1)``: one contiguous byte range per block."""
    # The adapter checked them: flat, C-contiguous uint8 of one block each.
    if l0 == 0 and l1 == blocks.num_layers:
        return bufs
    S = blocks._bytes_per_layer
    return [b[l0 * S:l1 * S] for b in bufs]


def _pieces(blocks: DeviceBlocks, n: int, nl: int) -> list[tuple[int, int]]:
    k = max(1, blocks.transfer.staging_bytes // (nl * blocks._bytes_per_layer))
    return [(i0, min(n, i0 + k)) for i0 in range(0, n, k)]


def out_direct(blocks: DeviceBlocks, idx: list[int], bufs: list[np.ndarray],
               l0: int, l1: int) -> None:
    """Copy layers ``[l0, l1)`` of blocks ``idx`` into ``bufs`` (one copy per block or run)."""
    torch = blocks._torch
    nl, S = l1 - l0, blocks._bytes_per_layer
    hosts = _host_parts(blocks, bufs, l0, l1)
    s = blocks._d2h
    s.after_compute()
    with s.context():
        for i0, i1 in _pieces(blocks, len(idx), nl):
            k = i1 - i0
            raw = _device_buffer(blocks, k * nl * S)[: k * nl * S]
            typed = raw.view(blocks.dtype).view(k, nl, *blocks._host_shape[1:])
            it = _index(blocks, idx[i0:i1])
            for li in range(l0, l1):
                typed[:, li - l0] = torch.index_select(blocks._layers[li], 0, it)
            per = raw.view(k, nl * S)
            part = hosts[i0:i1]
            for j0, j1 in _coalesced(part):
                dst = torch.from_numpy(_span(part, j0, j1))
                dst.copy_(per[j0:j1].reshape(-1), non_blocking=blocks.on_cuda)
        # The host buffers are read by the caller once this returns.
        s.synchronize()


def in_direct(blocks: DeviceBlocks, idx: list[int], bufs: list[np.ndarray],
              l0: int, l1: int) -> None:
    """Copy ``bufs``' layers ``[l0, l1)`` into blocks ``idx`` (one copy per block or run)."""
    torch = blocks._torch
    nl, S = l1 - l0, blocks._bytes_per_layer
    hosts = _host_parts(blocks, bufs, l0, l1)
    s = blocks._h2d
    with s.context():
        for i0, i1 in _pieces(blocks, len(idx), nl):
            k = i1 - i0
            raw = _device_buffer(blocks, k * nl * S)[: k * nl * S]
            per = raw.view(k, nl * S)
            part = hosts[i0:i1]
            for j0, j1 in _coalesced(part):
                src = torch.from_numpy(_span(part, j0, j1))
                per[j0:j1].reshape(-1).copy_(src, non_blocking=blocks.on_cuda)
            typed = raw.view(blocks.dtype).view(k, nl, *blocks._host_shape[1:])
            it = _index(blocks, idx[i0:i1])
            for li in range(l0, l1):
                _scatter(blocks, blocks._layers[li], it, idx[i0:i1], typed[:, li - l0])
        # The caller may reuse the host buffers once this returns.
        s.synchronize()


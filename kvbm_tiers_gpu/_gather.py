"""The ``gather`` strategy: a batch's layers through one contiguous (pinned) staging buffer.

Offload: an ``index_select`` per layer gathers the batch's blocks into a contiguous
device buffer, one copy moves it to pinned host staging, and the host scatters it
into the block buffers. Onboard is the reverse. Batches larger than a staging buffer
go in pieces; two buffers alternate so the host side of one piece overlaps the device
side of the next. On CPU tensors the "device" buffer is the staging buffer itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .blocks import DeviceBlocks
    from .layerwise import LayerSignal


def pieces(blocks: DeviceBlocks, n: int,
           groups: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(l0, l1, i0, i1): layers [l0, l1) of blocks [i0, i1), each fitting one staging buffer."""
    half = blocks._out_staging.nbytes
    out = []
    for l0, l1 in groups:
        unit = (l1 - l0) * blocks._bytes_per_layer
        k = max(1, half // unit)
        for i0 in range(0, n, k):
            out.append((l0, l1, i0, min(n, i0 + k)))
    return out


def _typed(blocks: DeviceBlocks, raw: Any, nl: int, k: int) -> Any:
    return raw.view(blocks.dtype).view(nl, k, *blocks._host_shape[1:])


def _index(blocks: DeviceBlocks, idx: list[int]) -> Any:
    torch = blocks._torch
    return torch.tensor(idx, dtype=torch.int64, device=blocks.device)


def _scatter(blocks: DeviceBlocks, layer: Any, it: Any, ids: list[int], src: Any) -> None:
    if blocks.on_cuda:
        layer.index_copy_(0, it, src)
    else:
        # CPU's index_copy_ moves bf16 element by element, ~6x slower than memcpy;
        # a copy per block is memcpy-speed there.
        for j, b in enumerate(ids):
            layer[b].copy_(src[j])


def out_gather(blocks: DeviceBlocks, idx: list[int], bufs: list[np.ndarray],
               l0: int, l1: int) -> None:
    """Copy layers [l0, l1) of blocks ``idx`` into their slices of ``bufs`` through staging."""
    torch = blocks._torch
    L, S = blocks.num_layers, blocks._bytes_per_layer
    nl = l1 - l0
    n = len(idx)
    parts = pieces(blocks, n, [(l0, l1)])
    s = blocks._d2h
    with blocks._out_staging.lock:
        stage = blocks._out_staging.buffers(max((i1 - i0) for _, _, i0, i1 in parts) * nl * S)

        def scatter(p: int, i0: int, i1: int) -> None:
            buf = stage[p % 2]
            buf.wait_ready()
            k = i1 - i0
            host = buf.host_np[: k * nl * S].reshape(nl, k, S)
            for j in range(k):
                np.copyto(bufs[i0 + j].reshape(L, S)[l0:l1], host[:, j])

        pending: tuple[int, int, int] | None = None
        s.after_compute()
        with s.context():
            for p, (_, _, i0, i1) in enumerate(parts):
                buf = stage[p % 2]
                k = i1 - i0
                nbytes = k * nl * S
                it = _index(blocks, idx[i0:i1])
                dev = _typed(blocks, buf.dev[:nbytes], nl, k)
                for li in range(l0, l1):
                    torch.index_select(blocks._layers[li], 0, it, out=dev[li - l0])
                if blocks.on_cuda:
                    buf.host[:nbytes].copy_(buf.dev[:nbytes], non_blocking=True)
                    ev = s.event()
                    s.record(ev)
                    buf.ready = ev
                # The host scatters the previous piece while the device copies this one.
                if pending is not None:
                    scatter(*pending)
                pending = (p, i0, i1)
        if pending is not None:
            scatter(*pending)


def in_gather(blocks: DeviceBlocks, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int,
              layerwise: bool, signal: LayerSignal | None) -> None:
    """Copy layers [l0, l1) of ``bufs`` into blocks ``idx`` through staging; per layer
    (signalling each) when ``layerwise``."""
    L, S = blocks.num_layers, blocks._bytes_per_layer
    n = len(idx)
    groups = [(li, li + 1) for li in range(l0, l1)] if layerwise else [(l0, l1)]
    parts = pieces(blocks, n, groups)
    s = blocks._h2d
    its: dict[tuple[int, int], Any] = {}
    with blocks._in_staging.lock:
        need = max((g1 - g0) * (i1 - i0) for g0, g1, i0, i1 in parts) * S
        stage = blocks._in_staging.buffers(need)
        with s.context():
            for p, (g0, g1, i0, i1) in enumerate(parts):
                buf = stage[p % 2]
                # Its previous copy must have read the host bytes before they change.
                buf.wait_ready()
                nl, k = g1 - g0, i1 - i0
                nbytes = nl * k * S
                host = buf.host_np[:nbytes].reshape(nl, k, S)
                for j in range(k):
                    np.copyto(host[:, j], bufs[i0 + j].reshape(L, S)[g0:g1])
                if blocks.on_cuda:
                    buf.dev[:nbytes].copy_(buf.host[:nbytes], non_blocking=True)
                it = its.get((i0, i1))
                if it is None:
                    it = its[(i0, i1)] = _index(blocks, idx[i0:i1])
                if blocks.copy_backend == "numpy":
                    hostv = host.reshape(nl, k, *blocks._np_block_shape[1:])
                    layers = blocks._np_layers
                    assert layers is not None, "the numpy backend runs on CPU tensors only"
                    for li in range(g0, g1):
                        layer = layers[li]
                        for j, b in enumerate(idx[i0:i1]):
                            np.copyto(layer[b], hostv[li - g0, j])
                else:
                    dev = _typed(blocks, buf.dev[:nbytes], nl, k)
                    for li in range(g0, g1):
                        _scatter(blocks, blocks._layers[li], it, idx[i0:i1], dev[li - g0])
                ev = s.event()
                s.record(ev)
                buf.ready = ev
                if signal is not None and i1 == n:
                    signal(g0, g1, n)
        s.synchronize()
        for sb in stage:
            sb.ready = None

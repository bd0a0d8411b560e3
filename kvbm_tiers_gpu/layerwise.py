"""The handle of a layer-wise onboard: ``wait_for_layer(i)`` returns once layer ``i`` is in.

A worker thread copies layer 0 of every block, then layer 1, and so on; after each
layer it marks the layer ready (on CUDA it first records an event on the onboard
stream). The engine's forward pass calls ``wait_for_layer(i)`` before attention of
layer ``i``, so the copies of later layers overlap the compute of earlier ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.errors import LayoutError

if TYPE_CHECKING:
    from kvbm.manager import KvBlockManager, Match

    from .blocks import DeviceBlocks

#: Called by a copy after it queued layers ``[l0, l1)`` of ``n`` blocks on the device.
LayerSignal = Callable[[int, int, int], None]


class LayerwiseOnboard:
    """A layer-wise onboard in flight. Made by ``DeviceBlocks.onboard_layerwise``
    or ``kvbm_tiers_gpu.onboard_layerwise``; never built by hand.

    Layer ``i`` counts as ready when every expected block's layer ``i`` is queued on
    the device (copied, on CPU). A failed transfer wakes every waiter and re-raises.
    """

    def __init__(
        self, blocks: DeviceBlocks, expected: int, on_layer: Callable[[int], None] | None = None
    ) -> None:
        self.num_layers = blocks.num_layers
        self.expected = expected
        self._blocks = blocks
        self._cuda = blocks.on_cuda
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._events: list[Any] = [None] * self.num_layers
        self._counts = [0] * self.num_layers
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._on_layer = on_layer
        self.error: BaseException | None = None
        self.result: Any = None

    # -- called by the copying thread --------------------------------------------------
    def _signal(self, l0: int, l1: int, n: int) -> None:
        """Layers ``[l0, l1)`` of ``n`` more blocks are queued on the device."""
        for li in range(l0, l1):
            with self._lock:
                self._counts[li] += n
                full = self._counts[li] >= self.expected and not self._ready[li].is_set()
            if full:
                self._mark(li)

    def _mark(self, li: int) -> None:
        if self._cuda:
            # Recorded after the layer's copies were queued: waiting on it orders the
            # engine's attention after exactly those copies.
            ev = self._blocks._h2d.event()
            self._blocks._h2d.record(ev)
            self._events[li] = ev
        self._ready[li].set()
        if self._on_layer is not None:
            self._on_layer(li)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result = result
        self.error = error
        # Layers some blocks never reached (a failed read in a lower tier) are released
        # too; ``result.loaded`` says which leading blocks are valid.
        for li in range(self.num_layers):
            if not self._ready[li].is_set():
                if error is None:
                    self._mark(li)
                else:
                    self._ready[li].set()
        self._done.set()

    # -- called by the engine -------------------------------------------------------------
    def wait_for_layer(self, index: int, timeout: float | None = None, *, host: bool = False) -> None:
        """Return once layer ``index`` of every block is on the device.

        On CUDA the current stream is made to wait for the layer's copies (the host
        does not block on the GPU) unless ``host=True``, which waits for the copies
        to finish. Raises the transfer's error if it failed, TimeoutError on timeout.
        """
        if not 0 <= index < self.num_layers:
            raise LayoutError(f"layer {index} is out of range [0, {self.num_layers})")
        if not self._ready[index].wait(timeout):
            raise TimeoutError(f"layer {index} was not onboarded within {timeout} s")
        if self.error is not None:
            raise self.error
        ev = self._events[index]
        if ev is not None:
            if host:
                ev.synchronize()
            else:
                import torch

                torch.cuda.current_stream(self._blocks.device).wait_event(ev)

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for every layer; return the result (``OnboardResult`` through a manager)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"layer-wise onboard not finished within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def done(self) -> bool:
        """Whether the worker finished (all layers in, or failed)."""
        return self._done.is_set()

    @property
    def layers_ready(self) -> int:
        """How many leading layers are on the device now."""
        n = 0
        while n < self.num_layers and self._ready[n].is_set():
            n += 1
        return n


class _LayerwiseDestination:
    """A ``BlockDestination`` that copies layer by layer and reports each layer to a handle."""

    def __init__(self, blocks: DeviceBlocks, handle: LayerwiseOnboard) -> None:
        self.blocks = blocks
        self.handle = handle

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        b = self.blocks
        idx = b._indices(indices, unique=True)
        bufs = b._buffers(src, len(idx), writable=False, what="src")
        b._copy_in(idx, bufs, 0, b.num_layers, layerwise=True, signal=self.handle._signal)


def onboard_layerwise(
    manager: KvBlockManager,
    match: Match,
    blocks: DeviceBlocks,
    indices: Sequence[int] | None = None,
    *,
    on_layer: Callable[[int], None] | None = None,
) -> LayerwiseOnboard:
    """``manager.onboard(match, blocks, indices)`` on a worker thread, layer by layer.

    Returns at once. ``handle.wait_for_layer(i)`` returns when layer ``i`` of every
    matched block is on the device (blocks of several tiers count together);
    ``handle.wait()`` returns the ``OnboardResult`` (only its first ``loaded`` blocks
    are valid). The layout and the block ids are checked here, before any copy.
    """
    blocks.check_layout(manager.layout)
    n = match.num_blocks
    idx = blocks._indices(range(n) if indices is None else indices, unique=True)
    if len(idx) != n:
        raise LayoutError(f"onboard: match has {n} blocks but {len(idx)} destination block ids")
    handle = LayerwiseOnboard(blocks, n, on_layer)
    dest = _LayerwiseDestination(blocks, handle)
    blocks._h2d.after_compute()  # the caller's current stream is the engine's
    blocks._start(handle, lambda: manager.onboard(match, dest, idx))
    return handle

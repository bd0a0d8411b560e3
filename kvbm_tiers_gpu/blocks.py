"""``DeviceBlocks``: the core's engine-tensor adapter with device transfers.

``kvbm.engine_blocks.LayerSeparateBlocks`` reads every engine arrangement (vLLM's
per-layer tensors of any version, MLA, TensorRT-LLM's pool, a pool of our own) and
copies blocks between it and kvbm's contiguous host buffers. ``DeviceBlocks`` keeps
its constructors and checks and adds what a device needs:

* a CUDA stream per direction, ordered after the engine's compute stream for offload
  (on CPU tensors the same code runs synchronously in the calling thread);
* two transfer strategies (``TransferConfig.strategy``): ``per_block``, one copy per
  contiguous run straight between engine tensor and host buffer, and ``gather``
  (``_gather``), an ``index_select`` per layer into a device buffer, one copy through
  pinned staging, and a host-side scatter, two staging buffers in turn; and
  ``direct`` (``_direct``), the same gather in the host buffers' order and one copy
  per block straight to or from its host buffer, with no host-side copy;
* copy backends for the per-block copies: torch, numpy byte views on CPU (the core's
  loops), CuPy's ``cudaMemcpyAsync`` on CUDA;
* layer-wise onboard (``onboard_layerwise``) on a worker thread behind a handle whose
  ``wait_for_layer(i)`` returns once layer ``i`` is on the device.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from kvbm.engine_blocks import EngineViews, KvLayout, LayerSeparateBlocks, run_depth, shape_of
from kvbm.errors import ConfigError, LayoutError
from kvbm.layout import BlockLayout

from . import _direct, _gather
from ._device import StagingPair, Stream
from .config import TransferConfig
from .layerwise import LayerSignal, LayerwiseOnboard, onboard_layerwise

__all__ = ["DeviceBlocks", "mla_blocks", "onboard_layerwise", "register_kv_caches",
           "trtllm_blocks", "vllm_blocks"]


class DeviceBlocks(LayerSeparateBlocks):
    """KV blocks in device (or CPU) tensors, addressed by the engine's block ids.

    Built as ``LayerSeparateBlocks`` is (its constructor and ``from_*`` methods, or
    ``register_kv_caches``; ``allocate`` for a pool of our own), with one more keyword,
    ``transfer`` (a ``TransferConfig``). ``copy_out`` / ``copy_in`` (kvbm's
    ``BlockSource`` / ``BlockDestination``) and the layer copies return when done.
    """

    def _init(self, views: EngineViews, layout: BlockLayout, *,
              transfer: TransferConfig | None = None) -> None:
        super()._init(views, layout)
        self.transfer = transfer or TransferConfig()
        item = layout.model.itemsize
        self._depth = [run_depth(t[0]) for t in self._layers]
        # The smallest contiguous run one copy can move: per layer, and per block.
        self.layer_run_bytes = min(
            math.prod(shape_of(t[0])[d:]) * item for t, d in zip(self._layers, self._depth)
        )
        self.block_run_bytes = (self._bytes_per_block if self._pool is not None
                                else self.layer_run_bytes)
        self._d2h = Stream(self.device)
        self._h2d = Stream(self.device)
        half = max(1, self.transfer.staging_bytes // 2)
        self._out_staging = StagingPair(self.device, half)
        self._in_staging = StagingPair(self.device, half)
        self._copier: Any = None
        self._direct_buf: Any = None  # the direct strategy's device buffer, made at first use
        backend = self.transfer.copy_backend
        if backend == "auto":
            backend = "torch" if self.on_cuda else "numpy"
        self.copy_backend = backend
        if backend == "cupy":
            from ._cupy import CupyCopier

            self._copier = CupyCopier(self.device)
        elif backend == "numpy" and self._np_layers is None:
            raise ConfigError(
                f"copy_backend: value 'numpy' copies host memory only, got device "
                f"{self.device}; use copy_backend: auto or torch"
            )
        self._worker: ThreadPoolExecutor | None = None
        self._worker_lock = threading.Lock()

    # -- introspection -------------------------------------------------------------------
    def strategy(self, layerwise: bool = False) -> Literal["gather", "direct", "per_block"]:
        """The strategy a transfer uses: the configured one, or by run size for ``auto``."""
        s = self.transfer.strategy
        if s != "auto":
            return s
        run = self.layer_run_bytes if layerwise else self.block_run_bytes
        threshold = self.transfer.threshold(self.on_cuda, self.copy_backend)
        return "gather" if run < threshold else "per_block"

    def stats(self) -> dict[str, Any]:
        """Where the blocks live and how they move."""
        return {
            **super().stats(),
            "strategy": self.strategy(),
            "layerwise_strategy": self.strategy(layerwise=True),
            "run_bytes": self.block_run_bytes,
            "staging_bytes": self._out_staging.allocated + self._in_staging.allocated,
        }

    # -- copies ----------------------------------------------------------------------------
    def _out(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        if not idx:
            return
        st = self.strategy(layerwise=l1 - l0 < self.num_layers)
        if st == "gather":
            _gather.out_gather(self, idx, bufs, l0, l1)
        elif st == "direct" and self._pool is None:
            _direct.out_direct(self, idx, bufs, l0, l1)
        elif self.copy_backend == "numpy":
            self._np_out(idx, bufs, l0, l1)
        else:
            self._out_per_block(idx, bufs, l0, l1)

    def _in(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        # Blocks handed to an onboard may have been freed by a request whose kernels are
        # still queued: order the copies after the compute queued so far.
        self._h2d.after_compute()
        self._copy_in(idx, bufs, l0, l1, layerwise=False, signal=None)

    def synchronize(self) -> None:
        """Wait for the copies queued on this adapter's streams (a no-op on CPU)."""
        self._d2h.synchronize()
        self._h2d.synchronize()

    def onboard_layerwise(
        self,
        indices: Sequence[int],
        src: Sequence[np.ndarray],
        *,
        on_layer: Callable[[int], None] | None = None,
    ) -> LayerwiseOnboard:
        """Start copying ``src[i]`` into block ``indices[i]`` layer by layer; returns at once.

        ``handle.wait_for_layer(i)`` returns when layer ``i`` of every block is on the
        device. ``src`` must stay untouched until ``handle.wait()`` returns (a host
        tier's slots under a pinned ``Match`` do). Bad input raises here, before any copy.
        """
        idx = self._indices(indices, unique=True)
        bufs = self._buffers(src, len(idx), writable=False, what="src")
        handle = LayerwiseOnboard(self, len(idx), on_layer)
        # In the caller's thread, whose current stream is the engine's compute stream.
        self._h2d.after_compute()

        def run() -> int:
            self._copy_in(idx, bufs, 0, self.num_layers, layerwise=True, signal=handle._signal)
            return len(idx)

        self._start(handle, run)
        return handle

    def _start(self, handle: LayerwiseOnboard, fn: Callable[[], Any]) -> None:
        with self._worker_lock:
            if self._worker is None:
                # One thread: layer-wise onboards run in order, as the engine asked for them.
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="kvbm-onboard")
            worker = self._worker

        def run() -> None:
            try:
                result = fn()
            except BaseException as e:
                handle._finish(error=e)
            else:
                handle._finish(result=result)

        worker.submit(run)

    def _copy_in(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int,
                 layerwise: bool, signal: LayerSignal | None) -> None:
        n = len(idx)
        if not idx:
            if signal is not None:
                signal(l0, l1, 0)
            return
        st = self.strategy(layerwise or l1 - l0 < self.num_layers)
        if st == "direct" and self._pool is None and not layerwise:
            _direct.in_direct(self, idx, bufs, l0, l1)
            if signal is not None:
                signal(l0, l1, n)
            return
        if st == "direct" and layerwise:
            st = "gather"  # a copy per layer is what a layer-wise onboard is for
        if st == "gather":
            _gather.in_gather(self, idx, bufs, l0, l1, layerwise, signal)
        elif self.copy_backend == "numpy":
            if not layerwise:
                self._np_in(idx, bufs, l0, l1)
                if signal is not None:
                    signal(l0, l1, n)
                return
            for li in range(l0, l1):
                self._np_in(idx, bufs, li, li + 1)
                if signal is not None:
                    signal(li, li + 1, n)
        else:
            self._in_per_block(idx, bufs, l0, l1, layerwise, signal)

    # -- per-block strategy, torch and CuPy copies -------------------------------------------
    def _copy(self, dst: Any, src: Any, stream: Stream) -> None:
        if self._copier is not None:
            self._copier.copy(dst, src, stream.raw)
        else:
            dst.copy_(src, non_blocking=self.on_cuda)

    @staticmethod
    def _runs(dev: Any, host: Any, depth: int) -> Iterator[tuple[Any, Any]]:
        if depth == 0:
            yield dev, host
            return
        for pos in itertools.product(*(range(int(s)) for s in dev.shape[:depth])):
            yield dev[pos], host[pos]

    def _out_per_block(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        s = self._d2h
        whole = self._pool is not None and l1 - l0 == self.num_layers
        # Called in the engine's thread: the copies follow the compute that wrote the KV.
        s.after_compute()
        with s.context():
            for b, buf in zip(idx, bufs):
                hv = self._host_view(buf)
                if whole:
                    self._copy(hv, self._pool[b], s)
                    continue
                for li in range(l0, l1):
                    for dev, host in self._runs(self._layers[li][b], hv[li], self._depth[li]):
                        self._copy(host, dev, s)
        s.synchronize()

    def _in_per_block(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int,
                      layerwise: bool, signal: LayerSignal | None) -> None:
        n = len(idx)
        s = self._h2d
        with s.context():
            views = [self._host_view(b) for b in bufs]
            if self._pool is not None and l1 - l0 == self.num_layers and not layerwise:
                for b, hv in zip(idx, views):
                    self._copy(self._pool[b], hv, s)
                if signal is not None:
                    signal(l0, l1, n)
            else:
                for li in range(l0, l1):
                    layer, d = self._layers[li], self._depth[li]
                    for b, hv in zip(idx, views):
                        for dev, host in self._runs(layer[b], hv[li], d):
                            self._copy(dev, host, s)
                    if signal is not None:
                        signal(li, li + 1, n)
        # The caller may reuse the host buffers once this returns.
        s.synchronize()

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the onboard worker after the transfers already started."""
        with self._worker_lock:
            w, self._worker = self._worker, None
        if w is not None:
            w.shutdown(wait=True)
        self._direct_buf = None


def register_kv_caches(
    kv_caches: Any,
    layout: BlockLayout,
    *,
    block_dim: int | None = None,
    num_blocks: int | None = None,
    names: Sequence[str] | None = None,
    form: str | None = None,
    kv_layout: KvLayout = "NHD",
    device: Any = None,
    transfer: TransferConfig | None = None,
) -> DeviceBlocks:
    """Register an engine's KV tensors as blocks addressed by the engine's block ids.

    ``kv_caches`` is vLLM's ``dict[layer_name, tensor]`` (ordered by layer) or a list of
    per-layer tensors, or one tensor for all layers (TensorRT-LLM's primary pool). The
    forms and keywords are ``LayerSeparateBlocks``'s; every check runs here, before any
    copy: dtype, shape, device and strides against ``layout``, with errors naming
    expected and got.
    """
    return DeviceBlocks(kv_caches, layout, block_dim, num_blocks=num_blocks, names=names,
                        form=form, kv_layout=kv_layout, device=device, transfer=transfer)


# Factories for the layout registry (``kvbm_register_layouts``): one name per engine.
def vllm_blocks(kv_caches: Any, layout: BlockLayout, **kwargs: Any) -> DeviceBlocks:
    """vLLM's per-layer tensors (``dict`` or list): 0.33's 4 dims, or 5 dims in either order."""
    return register_kv_caches(kv_caches, layout, **kwargs)


def trtllm_blocks(pool: Any, layout: BlockLayout, **kwargs: Any) -> DeviceBlocks:
    """TensorRT-LLM's primary pool ``[blocks, layers, kv_factor, block_size]``."""
    return DeviceBlocks.from_pool(pool, layout, **kwargs)


def mla_blocks(kv_caches: Any, layout: BlockLayout, **kwargs: Any) -> DeviceBlocks:
    """MLA's per-layer latent caches ``[blocks, page, head_dim]`` (outer dim 1)."""
    if layout.model.outer_dim != 1:
        raise LayoutError(
            f"mla layout: expected model.outer_dim 1, got {layout.model.outer_dim}; "
            "set model.outer_dim: 1 and num_kv_heads: 1 for MLA"
        )
    return register_kv_caches(kv_caches, layout, **kwargs)

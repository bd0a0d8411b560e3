"""An engine's KV tensors (or a pool of our own) as blocks addressed by block id.

``DeviceBlocks`` is a ``BlockSource`` and a ``BlockDestination``: ``copy_out`` moves
blocks from the device into host buffers (offload), ``copy_in`` moves them back
(onboard), and ``onboard_layerwise`` does the latter layer by layer behind a handle
whose ``wait_for_layer(i)`` returns once layer ``i`` is on the device.

Host buffers always hold a block *fully contiguous*: ``[num_layers, outer, page,
heads, head_dim]`` in C order (``BlockLayout.block_shape``), whatever the engine's
arrangement, so a block offloaded from vLLM reads back into TensorRT-LLM's pool.

Engine arrangements registered here, each viewed per layer as ``[num_blocks, outer,
page, heads, head_dim]`` without copying:

* vLLM, one tensor per layer: ``[2, num_blocks, page, heads, head_dim]`` (FlashAttention)
  or ``[num_blocks, 2, page, heads, head_dim]`` (FlashInfer), detected from the shape;
  any stride order (vLLM's HND backends permute the storage) as long as ``head_dim``
  is the innermost dimension;
* vLLM MLA, one tensor per layer ``[num_blocks, page, head_size]`` (outer dim 1, one head);
* vLLM's CPU backend, one tensor per layer ``[num_blocks, heads, page, 2 × head_dim]``
  whose memory is ``[num_blocks, heads, 2, page, head_dim]``;
* TensorRT-LLM, one tensor for all layers: its primary pool
  ``[num_blocks, num_layers, kv_factor, tokens_per_block × heads × head_dim]``
  (``KVCacheBlockPool``); inside a block it is NHD in the PyTorch backend and HND in
  the C++ engine backend (``kv_layout``). Its NHD pool is byte for byte our host
  format, so a block is one contiguous copy.

Two transfer strategies (``TransferConfig.strategy``):

* ``per_block``: one copy per contiguous run (a whole block for a fully contiguous
  pool; one layer, or one K or V half of it, for vLLM) straight between the engine
  tensor and the host buffer;
* ``gather``: an ``index_select`` per layer gathers the batch into a contiguous device
  buffer, one copy moves it to pinned staging, and the host scatters it into the
  buffers (the reverse for onboard). Two staging buffers alternate so the host side
  of one piece overlaps the device side of the next.

On a CUDA device the copies run on a stream per direction, ordered after the
engine's compute stream for offload; on CPU tensors the same code runs synchronously.
"""

from __future__ import annotations

import itertools
import math
import operator
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from kvbm.errors import ConfigError, LayoutError
from kvbm.layout import BlockLayout
from kvbm.layout import aligned_empty as _aligned_empty

from ._device import StagingPair, Stream, import_torch, resolve_device
from .config import TransferConfig
from .layerwise import LayerwiseOnboard

if TYPE_CHECKING:
    from kvbm.manager import KvBlockManager, Match

KvLayout = Literal["NHD", "HND"]
#: Called by a copy after it queued layers ``[l0, l1)`` of ``n`` blocks on the device.
LayerSignal = Callable[[int, int, int], None]


def _shape(t: Any) -> list[int]:
    return [int(s) for s in t.shape]


def _non_overlapping(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether no two elements of a strided view share memory (no broadcast, no aliasing)."""
    dims = sorted((st, sz) for sz, st in zip(shape, strides) if sz > 1)
    need = 1
    for st, sz in dims:
        if st < need:
            return False
        need = st * sz
    return True


def _run_depth(block_view: Any) -> int:
    """How many leading dims of one block's layer slice to split it along for contiguous runs."""
    shape = _shape(block_view)
    strides = list(block_view.stride())
    expect = 1
    depth = len(shape)
    for d in range(len(shape) - 1, -1, -1):
        if shape[d] != 1 and strides[d] != expect:
            break
        expect *= shape[d]
        depth = d
    return depth


class DeviceBlocks:
    """KV blocks in device (or CPU) tensors, addressed by the engine's block ids.

    Build one with ``register_kv_caches`` (an engine's tensors) or
    ``DeviceBlocks.allocate`` (a pool of our own). Implements ``copy_out`` / ``copy_in``
    (kvbm's ``BlockSource`` / ``BlockDestination``), so ``KvBlockManager.offload`` and
    ``onboard`` use it directly.
    """

    def __init__(
        self,
        layers: Sequence[Any],
        layout: BlockLayout,
        *,
        pool: Any = None,
        engine: str = "own",
        transfer: TransferConfig | None = None,
    ) -> None:
        """Use ``register_kv_caches``, ``from_layers``, ``from_pool`` or ``allocate``.

        ``layers[l]`` is a ``[num_blocks, outer, page, heads, head_dim]`` view of layer
        ``l``; ``pool``, when given, is a ``[num_blocks, num_layers, outer, page, heads,
        head_dim]`` view whose every block is one contiguous region.
        """
        torch = import_torch()
        self._torch = torch
        self.layout = layout
        m = layout.model
        self.num_layers = m.num_layers
        self.num_blocks = int(layers[0].shape[0])
        self.device = layers[0].device
        self.on_cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, m.dtype)
        self.engine = engine
        self.transfer = transfer or TransferConfig()
        self._layers = list(layers)
        self._pool = pool
        self._bytes_per_layer = layout.bytes_per_layer
        self._bytes_per_block = layout.bytes_per_block
        self._block_shape = (m.num_layers, m.outer_dim, layout.page_size, m.num_kv_heads, m.head_dim)
        self._depth = [_run_depth(t[0]) for t in self._layers]
        item = m.itemsize
        # The smallest contiguous run one copy can move: per layer, and per block.
        self.layer_run_bytes = min(
            math.prod(_shape(t[0])[d:]) * item for t, d in zip(self._layers, self._depth)
        )
        self.block_run_bytes = self._bytes_per_block if pool is not None else self.layer_run_bytes
        self._d2h = Stream(self.device)
        self._h2d = Stream(self.device)
        half = max(1, self.transfer.staging_bytes // 2)
        self._out_staging = StagingPair(self.device, half)
        self._in_staging = StagingPair(self.device, half)
        self._copier: Any = None
        backend = self.transfer.copy_backend
        if backend == "auto":
            backend = "torch" if self.on_cuda else "numpy"
        self.copy_backend = backend
        if backend == "cupy":
            from ._cupy import CupyCopier

            self._copier = CupyCopier(self.device)
        elif backend == "numpy":
            if self.on_cuda:
                raise ConfigError(
                    f"copy_backend: value 'numpy' copies host memory only, got device "
                    f"{self.device}; use copy_backend: auto or torch"
                )
            # Byte views of the same memory: np.copyto costs ~1 µs a call against ~5 µs
            # for torch's dispatch, and copies a strided slice in one call.
            self._np_layers = [t.view(torch.uint8).numpy() for t in self._layers]
            self._np_pool = pool.view(torch.uint8).numpy() if pool is not None else None
            self._np_block_shape = (*self._block_shape[:-1], self._block_shape[-1] * item)
        self._worker: ThreadPoolExecutor | None = None
        self._worker_lock = threading.Lock()

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_layers(
        cls,
        kv_caches: Sequence[Any],
        layout: BlockLayout,
        *,
        names: Sequence[str] | None = None,
        block_dim: int | None = None,
        device: Any = None,
        transfer: TransferConfig | None = None,
    ) -> DeviceBlocks:
        """vLLM's tensors, one per layer: ``[2, nb, page, heads, hd]``, ``[nb, 2, …]``, MLA
        ``[nb, page, hd]``, or the CPU backend's ``[nb, heads, page, 2 × hd]``.

        ``block_dim`` (0 or 1) forces which of the first two dims counts blocks; it is
        detected otherwise. ``device``, when given, is where the tensors must be.
        """
        torch = import_torch()
        m = layout.model
        names = list(names) if names is not None else [str(i) for i in range(len(kv_caches))]
        if len(kv_caches) != m.num_layers:
            raise LayoutError(
                f"kv_caches: expected {m.num_layers} layer tensors (model.num_layers), "
                f"got {len(kv_caches)}"
            )
        want_dtype = getattr(torch, m.dtype)
        want_device = resolve_device(device) if device is not None else None
        page, heads, hd, outer = layout.page_size, m.num_kv_heads, m.head_dim, m.outer_dim
        views: list[Any] = []
        want_shape: list[int] | None = None
        form = ""
        shapes = {
            "mla": "[blocks, page, head_dim]",
            "vllm-cpu": "[blocks, heads, page, outer*head_dim]",
            "vllm": "[outer, blocks, page, heads, head_dim]",
            "vllm[blocks-first]": "[blocks, outer, page, heads, head_dim]",
        }
        for li, t in enumerate(kv_caches):
            what = f"kv_caches[{names[li]!r}]"
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != want_dtype:
                raise LayoutError(
                    f"{what}: expected dtype {want_dtype} (model.dtype {m.dtype!r}), got {t.dtype}"
                )
            if want_device is None:
                want_device = t.device
            if t.device != want_device:
                raise LayoutError(
                    f"{what}: expected device {want_device} (as the other layers), got {t.device}"
                )
            if want_shape is None:
                nb = int(t.shape[0]) if t.dim() else 0
                if t.dim() == 3 and outer == 1:
                    form = "mla"
                    if heads != 1:
                        raise LayoutError(
                            f"{what}: a 3-dim MLA tensor [blocks, page, head_dim] holds one head, "
                            f"but model.num_kv_heads is {heads}; set num_kv_heads: 1 for MLA"
                        )
                    want_shape = [nb, page, hd]
                elif t.dim() == 4:
                    # vLLM's CPU backend: [blocks, heads, page, 2*head_dim] whose memory is
                    # [blocks, heads, 2, page, head_dim] (it views it as 2*page rows).
                    form = "vllm-cpu"
                    want_shape = [nb, heads, page, outer * hd]
                else:
                    block_dim = cls._detect_block_dim(t, layout, what, block_dim)
                    form = "vllm" if block_dim == 1 else "vllm[blocks-first]"
                    want_shape = [outer, page, heads, hd]
                    want_shape.insert(block_dim, int(t.shape[block_dim]))
            if _shape(t) != want_shape:
                raise LayoutError(
                    f"{what}: expected shape {want_shape} {shapes[form]}, got {_shape(t)}"
                )
            cls._check_strides(t, what)
            # Every layer is viewed as [blocks, outer, page, heads, head_dim], no copy.
            if form == "mla":
                views.append(t.unsqueeze(1).unsqueeze(3))
            elif form == "vllm-cpu":
                if not t.is_contiguous():
                    raise LayoutError(
                        f"{what}: expected a contiguous tensor (vLLM's CPU cache is one "
                        f"allocation per layer), got strides {list(t.stride())}"
                    )
                views.append(t.view(want_shape[0], heads, outer, page, hd).permute(0, 2, 3, 1, 4))
            else:
                views.append(t.transpose(0, 1) if block_dim == 1 else t)
        assert want_shape is not None, "num_layers > 0 is checked by ModelSpec"
        if views[0].shape[0] == 0:
            raise LayoutError("kv_caches: expected at least one block, got num_blocks=0")
        blocks = cls(views, layout, engine=form, transfer=transfer)
        blocks.layer_names = names
        return blocks

    @staticmethod
    def _detect_block_dim(t: Any, layout: BlockLayout, what: str, forced: int | None) -> int:
        m = layout.model
        if t.dim() != 5:
            raise LayoutError(
                f"{what}: expected 5 dims [outer={m.outer_dim}, blocks, page, heads, head_dim] or "
                f"[blocks, outer={m.outer_dim}, page, heads, head_dim]"
                + (" (or MLA's 3 dims [blocks, page, head_dim])" if m.outer_dim == 1 else "")
                + f", got shape {_shape(t)}"
            )
        tail = [layout.page_size, m.num_kv_heads, m.head_dim]
        if _shape(t)[2:] != tail:
            raise LayoutError(
                f"{what}: expected trailing dims [page={layout.page_size}, heads={m.num_kv_heads}, "
                f"head_dim={m.head_dim}], got {_shape(t)[2:]}"
            )
        if forced is not None:
            if forced not in (0, 1):
                raise LayoutError(f"block_dim: expected 0 or 1, got {forced!r}")
            if t.shape[1 - forced] != m.outer_dim:
                raise LayoutError(
                    f"{what}: block_dim={forced} needs dim {1 - forced} to be outer_dim="
                    f"{m.outer_dim}, got shape {_shape(t)}"
                )
            return forced
        d0, d1 = int(t.shape[0]), int(t.shape[1])
        if d0 == m.outer_dim and d1 == m.outer_dim:
            raise LayoutError(
                f"{what}: shape {_shape(t)} is ambiguous: both dim 0 and dim 1 equal "
                f"outer_dim={m.outer_dim}; pass block_dim=1 for vLLM's [2, blocks, …] or "
                "block_dim=0 for [blocks, 2, …]"
            )
        if d0 == m.outer_dim:
            return 1
        if d1 == m.outer_dim:
            return 0
        raise LayoutError(
            f"{what}: expected dim 0 or dim 1 to be outer_dim={m.outer_dim} (K and V), "
            f"got shape {_shape(t)}"
        )

    @staticmethod
    def _check_strides(t: Any, what: str) -> None:
        strides = list(t.stride())
        if t.shape[-1] > 1 and strides[-1] != 1:
            raise LayoutError(
                f"{what}: expected head_dim (the last dim) to have stride 1, got strides "
                f"{strides}; pass the engine's tensor, not a transposed view"
            )
        if not _non_overlapping(_shape(t), strides):
            raise LayoutError(
                f"{what}: expected a tensor whose elements do not overlap, got shape "
                f"{_shape(t)} with strides {strides} (an expanded or aliased view)"
            )

    @classmethod
    def from_pool(
        cls,
        pool: Any,
        layout: BlockLayout,
        *,
        kv_layout: KvLayout = "NHD",
        device: Any = None,
        transfer: TransferConfig | None = None,
        engine: str = "trtllm",
    ) -> DeviceBlocks:
        """One fully contiguous tensor for all layers, as TensorRT-LLM's primary pool.

        Shape ``[num_blocks, num_layers, outer, page × heads × head_dim]`` (TensorRT-LLM's
        ``KVCacheBlockPool``), ``[…, page, heads × head_dim]``, or 6 dims ``[…, page, heads,
        head_dim]`` (``kv_layout="HND"``: ``[…, heads, page, head_dim]``, the C++ backend's
        order inside a block; its blocks are reordered to NHD on the way to the host).
        """
        torch = import_torch()
        m = layout.model
        what = "kv_cache pool"
        if not isinstance(pool, torch.Tensor):
            raise LayoutError(f"{what}: expected a torch.Tensor, got {type(pool).__name__}")
        want_dtype = getattr(torch, m.dtype)
        if pool.dtype != want_dtype:
            raise LayoutError(
                f"{what}: expected dtype {want_dtype} (model.dtype {m.dtype!r}), got {pool.dtype}; "
                "an fp8 pool held as uint8 can be passed as pool.view(torch.float8_e4m3fn)"
            )
        if device is not None and pool.device != resolve_device(device):
            raise LayoutError(f"{what}: expected device {resolve_device(device)}, got {pool.device}")
        if kv_layout not in ("NHD", "HND"):
            raise LayoutError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
        page, heads, hd = layout.page_size, m.num_kv_heads, m.head_dim
        inner = (heads, page, hd) if kv_layout == "HND" else (page, heads, hd)
        nb = int(pool.shape[0]) if pool.dim() > 0 else 0
        head = [nb, m.num_layers, m.outer_dim]
        accepted = [head + [page * heads * hd], head + list(inner)]
        if kv_layout == "NHD":
            accepted.append(head + [page, heads * hd])
        if _shape(pool) not in accepted:
            raise LayoutError(
                f"{what}: expected shape [blocks, num_layers={m.num_layers}, "
                f"outer={m.outer_dim}, page*heads*head_dim={page * heads * hd}] or "
                f"{accepted[1]} ({kv_layout}), got {_shape(pool)}"
            )
        if nb == 0:
            raise LayoutError(f"{what}: expected at least one block, got shape {_shape(pool)}")
        if not pool.is_contiguous():
            raise LayoutError(
                f"{what}: expected a contiguous tensor (the pool is one allocation), got strides "
                f"{list(pool.stride())} for shape {_shape(pool)}"
            )
        v = pool.view(*head, *inner)
        if kv_layout == "HND":
            v = v.permute(0, 1, 2, 4, 3, 5)
            full = None
        else:
            full = v
        layers = [v[:, li] for li in range(m.num_layers)]
        return cls(layers, layout, pool=full, engine=engine, transfer=transfer)

    @classmethod
    def allocate(
        cls,
        layout: BlockLayout,
        num_blocks: int,
        device: Any = "auto",
        *,
        transfer: TransferConfig | None = None,
    ) -> DeviceBlocks:
        """A zeroed pool of our own, fully contiguous: ``[num_blocks, num_layers, outer, page, heads, hd]``."""
        torch = import_torch()
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise LayoutError(f"num_blocks: expected a positive integer, got {num_blocks!r}")
        dev = resolve_device(device)
        nbytes = num_blocks * layout.bytes_per_block
        if dev.type == "cuda":
            raw = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        else:
            # Page-aligned and zero-filled by the kernel; torch shares the memory.
            raw = torch.from_numpy(_aligned_empty(nbytes))
        m = layout.model
        typed = raw.view(getattr(torch, m.dtype)).view(
            num_blocks, m.num_layers, m.outer_dim, layout.page_size * m.inner_dim
        )
        blocks = cls.from_pool(typed, layout, transfer=transfer, engine="own")
        blocks.raw = raw
        return blocks

    # -- introspection ---------------------------------------------------------
    #: The pool's bytes when ``allocate`` made it (a ``uint8`` tensor), else None.
    raw: Any = None
    #: Layer names in order (vLLM's dict keys; "0", "1", … otherwise).
    layer_names: list[str] | None = None

    def layer_index(self, name: str) -> int:
        """The index of layer ``name`` (a key of the dict given to ``register_kv_caches``)."""
        names = self.layer_names or [str(i) for i in range(self.num_layers)]
        try:
            return names.index(name)
        except ValueError:
            raise LayoutError(
                f"layer {name!r} is not a registered layer; known: {', '.join(names[:4])}"
                + (", …" if len(names) > 4 else "")
            ) from None

    def layer(self, index: int) -> Any:
        """Layer ``index`` as a ``[num_blocks, outer, page, heads, head_dim]`` view (no copy)."""
        return self._layers[index]

    def check_layout(self, layout: BlockLayout) -> None:
        """Raise LayoutError unless ``layout`` arranges blocks as these tensors do."""
        if layout.digest != self.layout.digest or layout.block_shape != self.layout.block_shape:
            raise LayoutError(
                f"layout mismatch: the registered tensors hold blocks of shape "
                f"{list(self.layout.block_shape)} {self.layout.model.dtype} (digest "
                f"{self.layout.digest}), got a layout of shape {list(layout.block_shape)} "
                f"{layout.model.dtype} (digest {layout.digest}); build the manager with the "
                "engine's model and page size"
            )

    def strategy(self, layerwise: bool = False) -> Literal["gather", "per_block"]:
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
            "device": str(self.device),
            "engine": self.engine,
            "num_blocks": self.num_blocks,
            "strategy": self.strategy(),
            "layerwise_strategy": self.strategy(layerwise=True),
            "run_bytes": self.block_run_bytes,
            "staging_bytes": self._out_staging.allocated + self._in_staging.allocated,
        }

    # -- validation --------------------------------------------------------------
    def _indices(self, indices: Sequence[int], unique: bool) -> list[int]:
        out: list[int] = []
        n = self.num_blocks
        for i in indices:
            try:
                b = operator.index(i)
            except TypeError:
                raise LayoutError(f"block id {i!r}: expected an integer, got {type(i).__name__}") from None
            if not 0 <= b < n:
                raise LayoutError(f"block id {b} is out of range [0, {n}) of the registered tensors")
            out.append(b)
        if unique and len(set(out)) != len(out):
            seen: set[int] = set()
            for b in out:
                if b in seen:
                    raise LayoutError(
                        f"block id {b} appears twice in one onboard; each destination block is "
                        "written once"
                    )
                seen.add(b)
        return out

    def _buffers(self, bufs: Sequence[np.ndarray], n: int, writable: bool, what: str) -> list[np.ndarray]:
        if len(bufs) != n:
            raise LayoutError(f"{what}: expected {n} buffers (one per block id), got {len(bufs)}")
        bb = self._bytes_per_block
        out: list[np.ndarray] = []
        for i, b in enumerate(bufs):
            if not isinstance(b, np.ndarray):
                raise LayoutError(f"{what}[{i}]: expected a numpy uint8 array, got {type(b).__name__}")
            if b.dtype != np.uint8 or b.nbytes != bb:
                raise LayoutError(
                    f"{what}[{i}]: expected {bb} bytes of uint8 (one block of layout "
                    f"{self.layout.digest}), got {b.dtype} with {b.nbytes} bytes"
                )
            if not b.flags.c_contiguous:
                raise LayoutError(f"{what}[{i}]: expected a C-contiguous buffer, got strides {b.strides}")
            if writable and not b.flags.writeable:
                raise LayoutError(f"{what}[{i}]: expected a writable buffer, got a read-only one")
            out.append(b.reshape(-1))
        return out

    # -- copies --------------------------------------------------------------------
    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        """Copy block ``indices[i]`` into host buffer ``dst[i]`` (offload); returns when done."""
        idx = self._indices(indices, unique=False)
        bufs = self._buffers(dst, len(idx), writable=True, what="dst")
        if not idx:
            return
        if self.strategy() == "gather":
            self._out_gather(idx, bufs)
        else:
            self._out_per_block(idx, bufs)

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        """Copy host buffer ``src[i]`` into block ``indices[i]`` (onboard); returns when done."""
        idx = self._indices(indices, unique=True)
        bufs = self._buffers(src, len(idx), writable=False, what="src")
        # Blocks handed to an onboard may have been freed by a request whose kernels are
        # still queued: order the copies after the compute queued so far.
        self._h2d.after_compute()
        self._copy_in(idx, bufs, layerwise=False, signal=None)

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
            self._copy_in(idx, bufs, layerwise=True, signal=handle._signal)
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

    def _copy_in(
        self, idx: list[int], bufs: list[np.ndarray], layerwise: bool, signal: LayerSignal | None
    ) -> None:
        if not idx:
            if signal is not None:
                signal(0, self.num_layers, 0)
            return
        if self.strategy(layerwise) == "gather":
            self._in_gather(idx, bufs, layerwise, signal)
        else:
            self._in_per_block(idx, bufs, layerwise, signal)

    # -- per-block strategy ----------------------------------------------------------
    def _host_view(self, buf: np.ndarray) -> Any:
        return self._torch.from_numpy(buf).view(self.dtype).view(self._block_shape)

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

    def _out_per_block(self, idx: list[int], bufs: list[np.ndarray]) -> None:
        if self.copy_backend == "numpy":
            pool, layers = self._np_pool, self._np_layers
            for b, buf in zip(idx, bufs):
                hv = buf.reshape(self._np_block_shape)
                if pool is not None:
                    np.copyto(hv, pool[b])
                    continue
                for li, layer in enumerate(layers):
                    np.copyto(hv[li], layer[b])
            return
        s = self._d2h
        # Called in the engine's thread: the copies follow the compute that wrote the KV.
        s.after_compute()
        with s.context():
            for b, buf in zip(idx, bufs):
                hv = self._host_view(buf)
                if self._pool is not None:
                    self._copy(hv, self._pool[b], s)
                    continue
                for li, layer in enumerate(self._layers):
                    for dev, host in self._runs(layer[b], hv[li], self._depth[li]):
                        self._copy(host, dev, s)
        s.synchronize()

    def _in_per_block(
        self, idx: list[int], bufs: list[np.ndarray], layerwise: bool, signal: LayerSignal | None
    ) -> None:
        n = len(idx)
        if self.copy_backend == "numpy":
            pool, layers = self._np_pool, self._np_layers
            hvs = [b.reshape(self._np_block_shape) for b in bufs]
            if pool is not None and not layerwise:
                for b, hv in zip(idx, hvs):
                    np.copyto(pool[b], hv)
                if signal is not None:
                    signal(0, self.num_layers, n)
                return
            for li, layer in enumerate(layers):
                for b, hv in zip(idx, hvs):
                    np.copyto(layer[b], hv[li])
                if signal is not None:
                    signal(li, li + 1, n)
            return
        s = self._h2d
        with s.context():
            views = [self._host_view(b) for b in bufs]
            if self._pool is not None and not layerwise:
                for b, hv in zip(idx, views):
                    self._copy(self._pool[b], hv, s)
                if signal is not None:
                    signal(0, self.num_layers, n)
            else:
                for li, layer in enumerate(self._layers):
                    d = self._depth[li]
                    for b, hv in zip(idx, views):
                        for dev, host in self._runs(layer[b], hv[li], d):
                            self._copy(dev, host, s)
                    if signal is not None:
                        signal(li, li + 1, n)
        # The caller may reuse the host buffers once this returns.
        s.synchronize()

    # -- gather strategy ------------------------------------------------------------
    def _pieces(self, n: int, groups: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
        """(l0, l1, i0, i1): layers [l0, l1) of blocks [i0, i1), each fitting one staging buffer."""
        half = self._out_staging.nbytes
        out = []
        for l0, l1 in groups:
            unit = (l1 - l0) * self._bytes_per_layer
            k = max(1, half // unit)
            for i0 in range(0, n, k):
                out.append((l0, l1, i0, min(n, i0 + k)))
        return out

    def _typed(self, raw: Any, nl: int, k: int) -> Any:
        _, outer, page, heads, hd = self._block_shape
        return raw.view(self.dtype).view(nl, k, outer, page, heads, hd)

    def _index(self, idx: list[int]) -> Any:
        return self._torch.tensor(idx, dtype=self._torch.int64, device=self.device)

    def _scatter(self, layer: Any, it: Any, ids: list[int], src: Any) -> None:
        if self.on_cuda:
            layer.index_copy_(0, it, src)
        else:
            # CPU's index_copy_ moves bf16 element by element, ~6x slower than memcpy;
            # a copy per block is memcpy-speed there.
            for j, b in enumerate(ids):
                layer[b].copy_(src[j])

    def _out_gather(self, idx: list[int], bufs: list[np.ndarray]) -> None:
        torch = self._torch
        L, S = self.num_layers, self._bytes_per_layer
        n = len(idx)
        pieces = self._pieces(n, [(0, L)])
        s = self._d2h
        with self._out_staging.lock:
            stage = self._out_staging.buffers(max((i1 - i0) for _, _, i0, i1 in pieces) * L * S)

            def scatter(p: int, i0: int, i1: int) -> None:
                buf = stage[p % 2]
                buf.wait_ready()
                k = i1 - i0
                host = buf.host_np[: k * L * S].reshape(L, k, S)
                for j in range(k):
                    np.copyto(bufs[i0 + j].reshape(L, S), host[:, j])

            pending: tuple[int, int, int] | None = None
            s.after_compute()
            with s.context():
                for p, (_, _, i0, i1) in enumerate(pieces):
                    buf = stage[p % 2]
                    k = i1 - i0
                    nbytes = k * L * S
                    it = self._index(idx[i0:i1])
                    dev = self._typed(buf.dev[:nbytes], L, k)
                    for li, layer in enumerate(self._layers):
                        torch.index_select(layer, 0, it, out=dev[li])
                    if self.on_cuda:
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

    def _in_gather(
        self, idx: list[int], bufs: list[np.ndarray], layerwise: bool, signal: LayerSignal | None
    ) -> None:
        L, S = self.num_layers, self._bytes_per_layer
        n = len(idx)
        groups = [(li, li + 1) for li in range(L)] if layerwise else [(0, L)]
        pieces = self._pieces(n, groups)
        s = self._h2d
        its: dict[tuple[int, int], Any] = {}
        with self._in_staging.lock:
            need = max((l1 - l0) * (i1 - i0) for l0, l1, i0, i1 in pieces) * S
            stage = self._in_staging.buffers(need)
            with s.context():
                for p, (l0, l1, i0, i1) in enumerate(pieces):
                    buf = stage[p % 2]
                    # Its previous copy must have read the host bytes before they change.
                    buf.wait_ready()
                    nl, k = l1 - l0, i1 - i0
                    nbytes = nl * k * S
                    host = buf.host_np[:nbytes].reshape(nl, k, S)
                    for j in range(k):
                        np.copyto(host[:, j], bufs[i0 + j].reshape(L, S)[l0:l1])
                    if self.on_cuda:
                        buf.dev[:nbytes].copy_(buf.host[:nbytes], non_blocking=True)
                    it = its.get((i0, i1))
                    if it is None:
                        it = its[(i0, i1)] = self._index(idx[i0:i1])
                    if self.copy_backend == "numpy":
                        hostv = host.reshape(nl, k, *self._np_block_shape[1:])
                        for li in range(l0, l1):
                            layer = self._np_layers[li]
                            for j, b in enumerate(idx[i0:i1]):
                                np.copyto(layer[b], hostv[li - l0, j])
                    else:
                        dev = self._typed(buf.dev[:nbytes], nl, k)
                        for li in range(l0, l1):
                            self._scatter(self._layers[li], it, idx[i0:i1], dev[li - l0])
                    ev = s.event()
                    s.record(ev)
                    buf.ready = ev
                    if signal is not None and i1 == n:
                        signal(l0, l1, n)
            s.synchronize()
            for sb in stage:
                sb.ready = None

    # -- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        """Stop the onboard worker after the transfers already started."""
        with self._worker_lock:
            w, self._worker = self._worker, None
        if w is not None:
            w.shutdown(wait=True)


def register_kv_caches(
    kv_caches: Any,
    layout: BlockLayout,
    *,
    block_dim: int | None = None,
    kv_layout: KvLayout = "NHD",
    device: Any = None,
    transfer: TransferConfig | None = None,
) -> DeviceBlocks:
    """Register an engine's KV tensors as blocks addressed by the engine's block ids.

    ``kv_caches`` is vLLM's ``dict[layer_name, tensor]`` (ordered by layer) or a list of
    per-layer tensors, or one tensor for all layers (TensorRT-LLM's primary pool,
    vLLM's cross-layer cache). Every check runs here, before any copy: dtype, shape,
    device and strides against ``layout``, with errors naming expected and got.
    """
    torch = import_torch()
    if isinstance(kv_caches, torch.Tensor):
        return DeviceBlocks.from_pool(kv_caches, layout, kv_layout=kv_layout, device=device,
                                      transfer=transfer)
    if isinstance(kv_caches, Mapping):
        names = [str(k) for k in kv_caches]
        tensors = list(kv_caches.values())
    elif isinstance(kv_caches, Sequence):
        names = None
        tensors = list(kv_caches)
    else:
        raise LayoutError(
            f"kv_caches: expected a dict or list of per-layer tensors or one pool tensor, "
            f"got {type(kv_caches).__name__}"
        )
    return DeviceBlocks.from_layers(tensors, layout, names=names, block_dim=block_dim,
                                    device=device, transfer=transfer)


class _LayerwiseDestination:
    """A ``BlockDestination`` that copies layer by layer and reports each layer to a handle."""

    def __init__(self, blocks: DeviceBlocks, handle: LayerwiseOnboard) -> None:
        self.blocks = blocks
        self.handle = handle

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        b = self.blocks
        idx = b._indices(indices, unique=True)
        bufs = b._buffers(src, len(idx), writable=False, what="src")
        b._copy_in(idx, bufs, layerwise=True, signal=self.handle._signal)


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


# Factories for the layout registry (``kvbm_register_layouts``): one name per engine.
def vllm_blocks(kv_caches: Any, layout: BlockLayout, **kwargs: Any) -> DeviceBlocks:
    """vLLM's per-layer tensors (``dict`` or list), either dim order."""
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

"""``LayerSeparateBlocks``: an engine's KV tensors as blocks, copied whole or a layer at a time.

A tier stores a block *fully contiguous*: ``bytes_per_block`` bytes in the order of
``BlockLayout.block_shape`` (``[num_layers, outer, page, heads × head_dim]``, C
order). An engine holds it in its own arrangement (``_forms`` lists them). This class
gathers a block from the engine's tensors into such a buffer (``copy_out``) and
scatters it back (``copy_in``), or does either for one layer's slice of the buffers
(``copy_layer_out`` / ``copy_layer_in``), which is what an engine that saves and
loads layer by layer needs.

On CPU tensors a batch is one native call (``_native``): the address of every
contiguous run of every (block, layer) slice is written by one C call from the block
ids and the buffers' addresses (``_native.block_table``; a host tier's rows are given
as one array and row numbers, ``copy_out_rows`` / ``copy_in_rows``), and one C loop
copies them all with the GIL released, so no Python call is made per block and layer,
and threads that split a batch never contend. Without
a C compiler, or for runs under ``_NATIVE_MIN_RUN`` bytes, the copies are
``np.copyto`` calls on byte views of the same memory (about 1 µs a call against
about 5 µs for torch's dispatch; one call copies a strided slice). On another device (CUDA with no plugin installed for it) they are
plain, synchronous ``Tensor.copy_`` calls on the current stream; a device plugin
adds streams, pinned staging and batched gathers in a subclass.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from ..errors import LayoutError
from ..layout import BlockLayout
from . import _huge, _native
from ._forms import (
    EngineViews,
    KvLayout,
    allocate_pool,
    import_torch,
    parse_layers,
    parse_pool,
    shape_of,
    split_tensors,
)
from ._runplan import RunPlan as _RunPlan

_B = TypeVar("_B", bound="LayerSeparateBlocks")
_U8 = np.dtype(np.uint8)
#: Runs shorter than this are copied by numpy's strided loops: per run, the native
#: path also reads 16 bytes of addresses.
_NATIVE_MIN_RUN = 1024
#: Copy a batch's runs in the order of their engine addresses (each layer's tensor
#: walked upwards, K then V), not block by block: the engine side is the scattered
#: one, and its reads (offload) stream ahead once they are monotonic. In the same
#: run, interleaved (64 random blocks of 2 MiB, one thread, load 11): offload medians
#: 138 -> 102 ms on 4 KiB pages, 73 -> 58 ms on 2 MiB pages; onboard unchanged.
_ENGINE_ORDER = True


class LayerSeparateBlocks:
    """An engine's KV blocks in per-layer tensors (or one pool tensor), addressed by block id.

    ``LayerSeparateBlocks(kv_caches, layout)`` takes vLLM's ``dict[name, tensor]`` or a
    list of per-layer tensors in any form of ``kvbm.engine_blocks`` (detected from the
    number of dims; ``form`` forces one), or one tensor for all layers (a pool). The
    ``from_*`` class methods name the form; ``allocate`` makes a pool of kvbm's own.
    Every check runs when it is built, before any copy: dtype, shape, device, strides
    and layer count against ``layout``, with errors naming the tensor, expected and got.

    ``copy_out`` / ``copy_in`` make it a kvbm ``BlockSource`` / ``BlockDestination``.
    """

    #: The pool's bytes when ``allocate`` made it (a ``uint8`` tensor), else None.
    raw: Any = None

    def __init__(
        self,
        kv_caches: Any,
        layout: BlockLayout,
        block_dim: int | None = None,
        *,
        num_blocks: int | None = None,
        names: Sequence[str] | None = None,
        form: str | None = None,
        kv_layout: KvLayout = "NHD",
        device: Any = None,
        **options: Any,
    ) -> None:
        torch = import_torch()
        if isinstance(kv_caches, torch.Tensor):
            if form is not None or block_dim is not None:
                raise LayoutError(
                    f"kv_caches: one tensor is read as a pool [blocks, layers, outer, …]; "
                    f"form={form!r} and block_dim={block_dim!r} apply to per-layer tensors, "
                    "pass a list or dict of them"
                )
            views = parse_pool(kv_caches, layout, kv_layout=kv_layout, device=device)
            _check_count(views, num_blocks)
        else:
            tensors, keys = split_tensors(kv_caches)
            views = parse_layers(tensors, layout, names=names if names is not None else keys,
                                 block_dim=block_dim, num_blocks=num_blocks, form=form,
                                 device=device)
        self._init(views, layout, **options)

    # -- constructors, one per form ----------------------------------------------------
    @classmethod
    def _build(cls: type[_B], views: EngineViews, layout: BlockLayout, **options: Any) -> _B:
        obj = cls.__new__(cls)
        obj._init(views, layout, **options)
        return obj

    @classmethod
    def from_layers(
        cls: type[_B],
        kv_caches: Any,
        layout: BlockLayout,
        *,
        names: Sequence[str] | None = None,
        block_dim: int | None = None,
        num_blocks: int | None = None,
        form: str | None = None,
        device: Any = None,
        **options: Any,
    ) -> _B:
        """Per-layer tensors (a dict, whose keys name the layers, or a list) of any form."""
        tensors, keys = split_tensors(kv_caches)
        views = parse_layers(tensors, layout, names=names if names is not None else keys,
                             block_dim=block_dim, num_blocks=num_blocks, form=form, device=device)
        return cls._build(views, layout, **options)

    @classmethod
    def from_vllm(
        cls: type[_B],
        kv_caches: Any,
        layout: BlockLayout,
        *,
        block_dim: int | None = None,
        names: Sequence[str] | None = None,
        device: Any = None,
        **options: Any,
    ) -> _B:
        """vLLM before 0.33: ``[2, num_blocks, page, heads, hd]`` or ``[num_blocks, 2, …]``
        per layer (``block_dim`` 1 or 0; detected when None)."""
        return cls.from_layers(kv_caches, layout, names=names, block_dim=block_dim,
                               form="vllm", device=device, **options)

    @classmethod
    def from_vllm_bhnc(
        cls: type[_B],
        kv_caches: Any,
        layout: BlockLayout,
        *,
        num_blocks: int | None = None,
        names: Sequence[str] | None = None,
        device: Any = None,
        **options: Any,
    ) -> _B:
        """vLLM 0.33's logical ``[num_blocks * ratio, heads, tokens, outer * hd]`` per layer.

        ``ratio = page_size / tokens`` kernel blocks make one manager block;
        ``num_blocks`` (the manager's block count), when given, is checked against it.
        """
        return cls.from_layers(kv_caches, layout, names=names, num_blocks=num_blocks,
                               form="vllm-bhnc", device=device, **options)

    @classmethod
    def from_mla(
        cls: type[_B],
        kv_caches: Any,
        layout: BlockLayout,
        *,
        num_blocks: int | None = None,
        names: Sequence[str] | None = None,
        device: Any = None,
        **options: Any,
    ) -> _B:
        """MLA latent caches: ``[num_blocks, page, hd]`` per layer, or vLLM 0.33's 4 dims."""
        if layout.model.outer_dim != 1:
            raise LayoutError(
                f"mla layout: expected model.outer_dim 1, got {layout.model.outer_dim}; "
                "set model.outer_dim: 1 and num_kv_heads: 1 for MLA"
            )
        return cls.from_layers(kv_caches, layout, names=names, num_blocks=num_blocks,
                               device=device, **options)

    @classmethod
    def from_pool(
        cls: type[_B],
        pool: Any,
        layout: BlockLayout,
        *,
        kv_layout: KvLayout = "NHD",
        device: Any = None,
        engine: str = "trtllm",
        **options: Any,
    ) -> _B:
        """One tensor for all layers, TensorRT-LLM's primary pool.

        Shape ``[num_blocks, num_layers, outer, page × heads × head_dim]``
        (``KVCacheBlockPool``), ``[…, page, heads × head_dim]``, or 6 dims ``[…, page,
        heads, head_dim]`` (``kv_layout="HND"``: ``[…, heads, page, head_dim]``, the C++
        backend's order inside a block; reordered to NHD on the way to the host).
        """
        return cls._build(parse_pool(pool, layout, kv_layout=kv_layout, device=device,
                                     engine=engine), layout, **options)

    @classmethod
    def allocate(cls: type[_B], layout: BlockLayout, num_blocks: int, device: Any = "auto",
                 **options: Any) -> _B:
        """A zeroed pool of kvbm's own, fully contiguous (``[num_blocks, layers, outer, page,
        heads × hd]``): ``device`` 'auto' (cuda when present, else cpu), 'cpu', 'cuda:N'."""
        return cls._build(allocate_pool(layout, num_blocks, device), layout, **options)

    def _init(self, views: EngineViews, layout: BlockLayout, *, huge_pages: Any = False) -> None:
        torch = import_torch()
        m = layout.model
        self._torch = torch
        self.layout = layout
        self.num_layers: int = m.num_layers
        self.num_blocks: int = int(views.layers[0].shape[0])
        self.device: Any = views.layers[0].device
        self.on_cuda: bool = self.device.type == "cuda"
        self.dtype: Any = getattr(torch, m.dtype)
        #: The form found (vllm, vllm[blocks-first], vllm-bhnc, vllm-cpu, mla, trtllm, own).
        self.engine: str = views.engine
        #: Layer names in order: vLLM's dict keys, "0", "1", … otherwise.
        self.layer_names: list[str] = list(views.names)
        self.block_dim = views.block_dim
        self.raw = views.raw
        self._index_of = {n: i for i, n in enumerate(self.layer_names)}
        self._layers = views.layers
        self._stacked = views.stacked
        self._pool = views.pool
        self._bytes_per_layer = layout.bytes_per_layer
        self._bytes_per_block = layout.bytes_per_block
        inner = shape_of(views.layers[0])[1:]
        self._host_shape = (m.num_layers, *inner)
        self._np_layers: list[np.ndarray] | None = None
        self._np_stacked: np.ndarray | None = None
        if self.device.type == "cpu":
            # Byte views of the same memory (any dtype, fp8 included): np.copyto moves a
            # strided slice in one call at memcpy speed, with a fifth of torch's overhead.
            u8 = torch.uint8
            self._np_layers = [t.view(u8).numpy() for t in views.layers]
            if views.stacked is not None:
                self._np_stacked = views.stacked.view(u8).numpy()
            self._np_block_shape = (*self._host_shape[:-1], inner[-1] * m.itemsize)
        #: ``huge_pages`` (``engine_huge_pages``): 'auto' moves the CPU tensors onto 2 MiB
        #: pages on a background thread (``_huge.HugePages``), True / 'on' before this
        #: returns, False / 'off' not at all.
        self.huge_pages: _huge.HugePages | None = None
        self._huge_sync: tuple[int, str | None] = (0, None)
        mode = _huge.mode_of(huge_pages)
        if mode != "off" and self.device.type == "cpu":
            spans = _storage_spans(views.layers)
            if mode == "on":
                self._huge_sync = _native.advise_huge_pages(spans)
            else:
                self.huge_pages = _huge.HugePages(spans, keep=views.layers)
        # Built here (the loop is compiled once per process), not on the first copy.
        self._plan: _RunPlan | None = (
            _RunPlan.build(self._np_layers, self._bytes_per_layer, _NATIVE_MIN_RUN)
            if self._np_layers is not None else None)

    @property
    def huge_page_bytes(self) -> int:
        """Bytes of the engine's tensors moved onto 2 MiB pages so far."""
        h = self.huge_pages
        return self._huge_sync[0] if h is None else h.done_bytes

    @property
    def huge_pages_refused(self) -> str | None:
        """Why the kernel refused 2 MiB pages (None: it did not)."""
        h = self.huge_pages
        return self._huge_sync[1] if h is None else h.refused

    # -- introspection -----------------------------------------------------------------
    def layer_index(self, name: str) -> int:
        """The index of layer ``name`` (a key of the dict the tensors came in)."""
        try:
            return self._index_of[name]
        except KeyError:
            names = self.layer_names
            raise LayoutError(
                f"layer {name!r} is not a registered layer; known: {', '.join(names[:4])}"
                + (", …" if len(names) > 4 else "")
            ) from None

    def layer(self, index: int) -> Any:
        """Layer ``index`` as a ``[num_blocks, outer, page, heads, head_dim]`` view (no copy);
        ``[num_blocks, outer, ratio, tokens, heads, head_dim]`` for vLLM 0.33 kernel blocks
        whose strides keep the two token dims apart."""
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

    def stats(self) -> dict[str, Any]:
        """Where the blocks live and in which form."""
        return {"device": str(self.device), "engine": self.engine, "num_blocks": self.num_blocks,
                "huge_page_bytes": self.huge_page_bytes}

    # -- validation --------------------------------------------------------------------
    def _layer_arg(self, layer: int | str) -> int:
        if isinstance(layer, str):
            return self.layer_index(layer)
        try:
            li = operator.index(layer)
        except TypeError:
            raise LayoutError(
                f"layer {layer!r}: expected an index or a layer name, got {type(layer).__name__}"
            ) from None
        if not 0 <= li < self.num_layers:
            raise LayoutError(f"layer {li} is out of range [0, {self.num_layers})")
        return li

    def _indices(self, indices: Sequence[int], unique: bool) -> list[int]:
        out: list[int] = []
        n = self.num_blocks
        for i in indices:
            try:
                b = operator.index(i)
            except TypeError:
                raise LayoutError(
                    f"block id {i!r}: expected an integer, got {type(i).__name__}"
                ) from None
            if not 0 <= b < n:
                raise LayoutError(
                    f"block id {b} is out of range [0, {n}) of the registered tensors"
                )
            out.append(b)
        if unique and len(set(out)) != len(out):
            seen: set[int] = set()
            for b in out:
                if b in seen:
                    raise LayoutError(
                        f"block id {b} appears twice in one copy into the engine; each "
                        "destination block is written once"
                    )
                seen.add(b)
        return out

    def _buffers(self, bufs: Sequence[np.ndarray], n: int, writable: bool,
                 what: str) -> list[np.ndarray]:
        if len(bufs) != n:
            raise LayoutError(f"{what}: expected {n} buffers (one per block id), got {len(bufs)}")
        bb = self._bytes_per_block
        out: list[np.ndarray] = []
        # Runs once per buffer per call, and a layer-wise engine calls once per layer:
        # the cheap tests come first (dtype identity, one flags object, no reshape of
        # a buffer that is flat already).
        for i, b in enumerate(bufs):
            if not isinstance(b, np.ndarray):
                raise LayoutError(
                    f"{what}[{i}]: expected a numpy uint8 array, got {type(b).__name__}"
                )
            if (b.dtype is not _U8 and b.dtype != _U8) or b.nbytes != bb:
                raise LayoutError(
                    f"{what}[{i}]: expected {bb} bytes of uint8 (one block of layout "
                    f"{self.layout.digest}), got {b.dtype} with {b.nbytes} bytes"
                )
            flags = b.flags
            if not flags.c_contiguous:
                raise LayoutError(
                    f"{what}[{i}]: expected a C-contiguous buffer, got strides {b.strides}"
                )
            if writable and not flags.writeable:
                raise LayoutError(f"{what}[{i}]: expected a writable buffer, got a read-only one")
            out.append(b if b.ndim == 1 else b.reshape(-1))
        return out

    # -- copies --------------------------------------------------------------------------
    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        """Copy block ``indices[i]`` into buffer ``dst[i]`` (offload); returns when done."""
        idx = self._indices(indices, unique=False)
        bufs = self._buffers(dst, len(idx), writable=True, what="dst")
        self._out(idx, bufs, 0, self.num_layers)

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        """Copy buffer ``src[i]`` into block ``indices[i]`` (onboard); returns when done."""
        idx = self._indices(indices, unique=True)
        bufs = self._buffers(src, len(idx), writable=False, what="src")
        self._in(idx, bufs, 0, self.num_layers)

    def copy_out_rows(self, indices: Sequence[int], rows: np.ndarray, at: Sequence[int]) -> None:
        """Copy block ``indices[i]`` into row ``at[i]`` of ``rows``: a C-contiguous uint8
        array ``[slots, bytes_per_block]`` (a host tier's arena). ``copy_out`` into
        ``rows[at[i]]``, with the buffers' addresses computed from the row numbers (no
        Python per block)."""
        plan = self._run_plan()
        if plan is None or not plan.copy_rows(indices, rows, at, self.num_blocks, True, False,
                                              _ENGINE_ORDER):
            b, r = self._rows_args(indices, rows, at, writable=True, unique=False)
            self._rows_copy(b, rows, r, out=True)

    def copy_in_rows(self, indices: Sequence[int], rows: np.ndarray, at: Sequence[int]) -> None:
        """Copy row ``at[i]`` of ``rows`` (as in ``copy_out_rows``) into block ``indices[i]``."""
        plan = self._run_plan()
        if plan is None or not plan.copy_rows(indices, rows, at, self.num_blocks, False, True,
                                              _ENGINE_ORDER):
            b, r = self._rows_args(indices, rows, at, writable=False, unique=True)
            self._rows_copy(b, rows, r, out=False)

    def _rows_copy(self, b: np.ndarray, rows: np.ndarray, r: np.ndarray, out: bool) -> None:
        if not len(b):
            return
        plan = self._run_plan()
        if plan is None:
            idx, bufs = b.tolist(), [rows[i] for i in r.tolist()]
            (self._out if out else self._in)(idx, bufs, 0, self.num_layers)
            return
        bp = r * rows.strides[0]
        bp += _native.address(rows)
        plan.copy_at(b, bp, 0, self.num_layers, out, _ENGINE_ORDER)

    def _rows_args(self, indices: Sequence[int], rows: np.ndarray, at: Sequence[int],
                   writable: bool, unique: bool) -> tuple[np.ndarray, np.ndarray]:
        """Block ids and row numbers as int64 arrays, checked as ``copy_out`` checks its
        arguments (vectorised; the same errors, from the same checks, where one fails)."""
        b = np.asarray(indices)
        n = len(b)
        r = _native.checked_rows(b, self.num_blocks, rows, at, self._bytes_per_block,
                                 writable, unique)  # one C call; else numpy, naming the value
        if r is not None:
            return b, r
        r = _native.row_numbers(rows, at, n, self._bytes_per_block, writable=writable,
                                what=f" (blocks of layout {self.layout.digest})")
        if (b.ndim != 1 or b.dtype.kind not in "iu"
                or (n and (int(b.min()) < 0 or int(b.max()) >= self.num_blocks))):
            b = np.asarray(self._indices(indices, unique), dtype=np.int64)  # raises here
        b = b.astype(np.int64, copy=False)
        if unique and n > 1:
            srt = np.sort(b)
            if (srt[1:] == srt[:-1]).any():
                self._indices(b.tolist(), unique=True)  # raises, naming the repeated id
        return b, r

    def copy_layer_out(self, layer: int | str, indices: Sequence[int],
                       dst: Sequence[np.ndarray]) -> None:
        """Copy layer ``layer`` (index or name) of block ``indices[i]`` into its slice of the
        whole-block buffer ``dst[i]``; the buffer's other layers are not touched."""
        li = self._layer_arg(layer)
        idx = self._indices(indices, unique=False)
        bufs = self._buffers(dst, len(idx), writable=True, what="dst")
        self._out(idx, bufs, li, li + 1)

    def copy_layer_in(self, layer: int | str, indices: Sequence[int],
                      src: Sequence[np.ndarray]) -> None:
        """Copy layer ``layer``'s slice of the whole-block buffer ``src[i]`` into block
        ``indices[i]``; the block's other layers are not touched."""
        li = self._layer_arg(layer)
        idx = self._indices(indices, unique=True)
        bufs = self._buffers(src, len(idx), writable=False, what="src")
        self._in(idx, bufs, li, li + 1)

    def synchronize(self) -> None:
        """Wait for copies queued on the device (none are left queued on CPU)."""
        if self.on_cuda:
            self._torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Stop a background move onto 2 MiB pages (after its call under way)."""
        if self.huge_pages is not None:
            self.huge_pages.stop()

    # -- the copy loops (validated arguments; layers [l0, l1)) ----------------------------
    def _out(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        if self._np_layers is not None:
            self._np_out(idx, bufs, l0, l1)
        else:
            self._torch_out(idx, bufs, l0, l1)

    def _in(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        if self._np_layers is not None:
            self._np_in(idx, bufs, l0, l1)
        else:
            self._torch_in(idx, bufs, l0, l1)

    @property
    def native_shared(self) -> bool:
        """Whether a batch copy is one native call (the executor shares it across its
        copy threads with ``_native.share``, rather than splitting the batch)."""
        return self._run_plan() is not None

    def _run_plan(self) -> _RunPlan | None:
        """The native plan for these CPU tensors; None where numpy copies."""
        return self._plan if _native.enabled else None

    def _np_out(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        plan = self._run_plan()
        if plan is not None and idx:
            plan.copy(idx, bufs, l0, l1, True, _ENGINE_ORDER)
            return
        copy, shape = np.copyto, self._np_block_shape
        stacked = self._np_stacked
        if stacked is not None:
            # Every layer in one strided view: one call per block.
            for b, buf in zip(idx, bufs):
                copy(buf.reshape(shape)[l0:l1], stacked[b, l0:l1])
            return
        layers = self._np_layers[l0:l1]  # type: ignore[index]
        for b, buf in zip(idx, bufs):
            hv = buf.reshape(shape)
            for li, layer in enumerate(layers, l0):
                copy(hv[li], layer[b])

    def _np_in(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        plan = self._run_plan()
        if plan is not None and idx:
            plan.copy(idx, bufs, l0, l1, False, _ENGINE_ORDER)
            return
        copy, shape = np.copyto, self._np_block_shape
        stacked = self._np_stacked
        if stacked is not None:
            for b, buf in zip(idx, bufs):
                copy(stacked[b, l0:l1], buf.reshape(shape)[l0:l1])
            return
        layers = self._np_layers[l0:l1]  # type: ignore[index]
        for b, buf in zip(idx, bufs):
            hv = buf.reshape(shape)
            for li, layer in enumerate(layers, l0):
                copy(layer[b], hv[li])

    def _host_view(self, buf: np.ndarray) -> Any:
        """A whole-block buffer as ``[num_layers, *inner]`` of the model's dtype (no copy)."""
        return self._torch.from_numpy(buf).view(self.dtype).view(self._host_shape)

    def _torch_out(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        stacked = self._stacked
        for b, buf in zip(idx, bufs):
            hv = self._host_view(buf)
            if stacked is not None:
                hv[l0:l1].copy_(stacked[b, l0:l1])
                continue
            for li in range(l0, l1):
                hv[li].copy_(self._layers[li][b])

    def _torch_in(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int) -> None:
        stacked = self._stacked
        for b, buf in zip(idx, bufs):
            hv = self._host_view(buf)
            if stacked is not None:
                stacked[b, l0:l1].copy_(hv[l0:l1])
                continue
            for li in range(l0, l1):
                self._layers[li][b].copy_(hv[li])


def _storage_spans(tensors: Sequence[Any]) -> list[tuple[int, int]]:
    """``(address, nbytes)`` of each distinct storage under ``tensors`` (a pool's layers
    share one)."""
    spans: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        spans[int(st.data_ptr())] = int(st.nbytes())
    return sorted(spans.items())


def _check_count(views: EngineViews, num_blocks: int | None) -> None:
    nb = int(views.layers[0].shape[0])
    if num_blocks is not None and nb != num_blocks:
        raise LayoutError(f"kv_cache pool: holds {nb} blocks, expected num_blocks={num_blocks}")

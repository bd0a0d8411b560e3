"""Block movers between transformers' per-layer KV tensors and kvbm's block bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kvbm.engine_blocks import _native
from kvbm.errors import LayoutError
from kvbm.layout import BlockLayout

from . import _fill, _table
from ._fill import LayerFill


class CacheBlockSource:
    """A ``BlockSource`` over per-layer ``[1, kv_heads, seq, head_dim]`` key/value tensors.

    ``copy_out_rows`` (the executor's path into a memory tier's rows) and ``copy_out``
    of token-major tensors (a kvbm room's views, where ``KvbmCache`` computes) move
    every block in one native call of ``2 × layers`` runs a block, shared with the
    executor's copy threads (``native_shared``), where a copy per layer's K or V was
    made into per-block views before.

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
        self._bases: np.ndarray | None | bool = False  # ``_token_major``'s, once read

    #: ``copy_out_rows`` and ``copy_out`` of token-major tensors copy a batch in one
    #: ``_native.run_copy``: the executor shares it with its copy threads.
    native_shared = True

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        """Gather blocks ``indices`` into ``dst`` (one kvbm block's bytes each)."""
        with torch.inference_mode():
            self._copy_out(indices, dst)

    def copy_out_rows(self, indices: Sequence[int], rows: np.ndarray, at: Sequence[int]) -> None:
        """Gather block ``indices[i]`` into row ``at[i]`` of ``rows`` (a tier's slots,
        ``[slots, bytes_per_block]`` uint8, C-contiguous, writable).

        Token-major tensors: one address table (block-major, each block's ``2 × layers``
        runs in its row's order) and one native copy, no view per block. Anything else:
        ``copy_out`` into views of the rows.
        """
        n = len(indices)
        r = _native.row_numbers(rows, at, n, self.layout.bytes_per_block, writable=True,
                                what=" (a tier's slots)")
        bases = self._token_major()
        runs = _native.copy_runs()
        if bases is None or runs is None or not n:
            self.copy_out(indices, [rows[i] for i in r.tolist()])
            return
        rp = r * rows.strides[0]
        rp += _native.address(rows)
        self._copy_at(runs, bases, self._blocks(indices), rp)

    def _blocks(self, indices: Sequence[int]) -> np.ndarray:
        """``indices`` as int64, each checked to lie within the source's blocks."""
        b = np.asarray(indices, dtype=np.int64)
        if b.ndim != 1:
            raise LayoutError(f"indices: expected a list of block numbers, got shape {list(b.shape)}")
        if b.size and umax(b) >= self.num_blocks:
            bad = next(int(x) for x in b if not 0 <= x < self.num_blocks)
            raise LayoutError(f"block index {bad} is out of range [0, {self.num_blocks})")
        return b

    def _token_major(self) -> np.ndarray | None:
        """Token 0's address of each (layer, K|V), in kvbm's block order, where every
        tensor is a token-major CPU tensor (``[heads, seq, head_dim]`` with the heads
        of a token adjacent, as a kvbm room's views): a block's slice of each is then
        one run of ``page × heads × head_dim`` values. None otherwise (read once)."""
        if self._bases is False:
            m = self.layout.model
            h, d = m.num_kv_heads, m.head_dim
            ok = all(t.device.type == "cpu" and t.stride(2) == 1 and t.stride(0) == d
                     and t.stride(1) == h * d for kv in self._kv for t in kv)
            self._bases = np.array([t.data_ptr() for kv in self._kv for t in kv],
                                   dtype=np.int64) if ok else None
        return self._bases if isinstance(self._bases, np.ndarray) else None

    def _copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        m = self.layout.model
        p = self.layout.page_size
        if len(indices) != len(dst):
            raise LayoutError(f"dst: expected {len(indices)} buffers, got {len(dst)}")
        for b in indices:
            if not 0 <= b < self.num_blocks:
                raise LayoutError(f"block index {b} is out of range [0, {self.num_blocks})")
        bases = self._token_major() if indices else None
        runs = _native.copy_runs()
        if bases is not None and runs is not None:
            self._runs_out(runs, bases, indices, dst)
            return
        rows = _native.copy_rows()
        if rows is not None and indices and all(
                t.device.type == "cpu" and t.stride(-1) == 1 for kv in self._kv for t in kv):
            self._native_out(rows, indices, dst)
            return
        for b, d in zip(indices, dst, strict=True):
            out = torch.from_numpy(d).view(self._dtype).view(
                m.num_layers, 2, p, m.num_kv_heads, m.head_dim
            )
            s = b * p
            for li, (k, v) in enumerate(self._kv):
                # [heads, page, head_dim] -> [page, heads, head_dim]: one strided copy each.
                out[li, 0].copy_(k[:, s : s + p].transpose(0, 1))
                out[li, 1].copy_(v[:, s : s + p].transpose(0, 1))

    def _runs_out(self, runs: _native.RunCopy, bases: np.ndarray, indices: Sequence[int],
                  dst: Sequence[np.ndarray]) -> None:
        """Token-major blocks ``indices`` into ``dst`` in one native call (checked)."""
        bpb = self.layout.bytes_per_block
        for x in dst:
            if x.nbytes != bpb or not x.flags.c_contiguous or not x.flags.writeable:
                raise LayoutError(f"dst: expected writable contiguous buffers of {bpb} bytes")
        bp = np.fromiter((_native.address(x) for x in dst), dtype=np.int64, count=len(dst))
        self._copy_at(runs, bases, np.asarray(indices, dtype=np.int64), bp)

    def _copy_at(self, runs: _native.RunCopy, bases: np.ndarray, blocks: np.ndarray,
                 dp: np.ndarray) -> None:
        """Token-major blocks ``blocks`` (int64, checked) into the whole-block buffers at
        addresses ``dp``: one address table (block-major, each block's ``2 × layers``
        runs in its buffer's order) and one native copy."""
        part = self.layout.bytes_per_block // len(bases)
        s_ = np.add.outer(blocks * part, bases).ravel()
        d = np.add.outer(dp, np.arange(len(bases), dtype=np.int64) * part).ravel()
        _native.run_copy(runs, len(d), d, s_, part)

    def _native_out(self, rows: _native.RowCopy, indices: Sequence[int],
                    dst: Sequence[np.ndarray]) -> None:
        """Every block in one native call per layer's K or V tensor.

        Head ``h`` of block ``b`` is ``page`` rows of ``head_dim`` values at stride
        ``stride(seq)`` in the cache tensor, and the same rows at stride ``heads ×
        head_dim`` in the block; in a token-major tensor (kvbm's room) the whole
        ``[page, heads, head_dim]`` slice is one contiguous run instead.
        """
        m = self.layout.model
        p = self.layout.page_size
        isz = m.itemsize
        h, d = m.num_kv_heads, m.head_dim
        b = np.asarray(indices, dtype=np.int64)
        bp = np.fromiter((_native.address(x) for x in dst), dtype=np.int64, count=len(dst))
        for x in dst:
            if x.nbytes != self.layout.bytes_per_block or not x.flags.c_contiguous \
                    or not x.flags.writeable:
                raise LayoutError(f"dst: expected writable contiguous buffers of "
                                  f"{self.layout.bytes_per_block} bytes")
        heads = np.arange(h, dtype=np.int64)
        part = p * h * d * isz  # one layer's K (or V) of one block
        for li, kv in enumerate(self._kv):
            for half, t in enumerate(kv):
                sh, ss = t.stride(0) * isz, t.stride(1) * isz
                src0 = t.data_ptr() + b * (p * ss)  # [n]
                dst0 = bp + (2 * li + half) * part
                if ss == h * d * isz and sh == d * isz:  # token-major: one run a block
                    rows(len(b), _native.address(np.ascontiguousarray(dst0)),
                         _native.address(np.ascontiguousarray(src0)), 1, part, 0, 0)
                    continue
                sp = (src0[:, None] + heads[None, :] * sh).reshape(-1)
                dp = (dst0[:, None] + heads[None, :] * (d * isz)).reshape(-1)
                rows(len(sp), _native.address(dp), _native.address(sp), p, d * isz,
                     h * d * isz, ss)


def umax(a: np.ndarray) -> int:
    """The largest element of int64 ``a`` seen as unsigned (a negative one is then larger
    than any bound), ``a`` not empty. ``argmax`` is one C call; ``ndarray.max`` goes
    through numpy's Python reduction wrapper, whose code a forward or a 128 MiB copy
    has evicted from the caches: right after the model's forward, 1 024 ids took 0.04 ms
    this way against 0.22 ms (medians of 12, docs/benchmarks/hf.md round 8)."""
    u = a.view(np.uint64)
    return int(u[u.argmax()])


def _addresses(bufs: Sequence[np.ndarray], nbytes: int) -> np.ndarray | None:
    """The first byte's address of each buffer, or None unless every one is a
    C-contiguous buffer of ``nbytes`` bytes. One pass, one ``__array_interface__`` a
    buffer (its ``strides`` is None exactly for C-contiguous arrays): a load's 512
    blocks took 0.6 ms here warm against 1 ms for two passes with ``flags``."""
    out = []
    for x in bufs:
        ai = x.__array_interface__
        if ai["strides"] is not None or x.nbytes != nbytes:
            return None
        out.append(ai["data"][0])
    return np.array(out, dtype=np.int64)


def _layer_pairs(t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(K, V)]`` per layer of a ``[layers, 2, ...]`` tensor."""
    return [(kv[0], kv[1]) for kv in (layer.unbind(0) for layer in t.unbind(0))]


class RoomViews:
    """What a load reads of a room, made once per pooled room (``room_views``).

    ``t``: the room seen as ``[layers, 2, 1, kv_heads, capacity, head_dim]``; ``pairs``:
    each layer's key and value room as ``[1, kv_heads, capacity, head_dim]`` views of
    it; ``at``: the address of token 0 of each (layer, K|V) in order, the room's part
    of every load's address table; ``lk``: 0 .. 2 × layers - 1. Python values and
    views, so a request reads no torch attribute of the room.
    """

    __slots__ = ("at", "at_addr", "cpu", "lk", "pairs", "t")

    def __init__(self, room: torch.Tensor) -> None:
        self.t = room.transpose(3, 4)
        self.pairs = _layer_pairs(self.t)
        token = room.shape[4] * room.shape[5] * room.element_size()  # one token's K (or V)
        self.lk = np.arange(2 * room.shape[0], dtype=np.int64)
        self.at = self.lk * (room.shape[3] * token) + room.data_ptr()
        #: ``at``'s address, for the compiled table (``kvbm_hf._table``).
        self.at_addr = _native.address(self.at)
        #: The room is in host memory (the native copies' only kind).
        self.cpu = room.device.type == "cpu"


def room_views(room: torch.Tensor) -> RoomViews:
    """``room``'s ``RoomViews`` (a pool makes them once per room: ``CacheBlockDestination.pooled``)."""
    return RoomViews(room)


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

    #: ``copy_in`` (and ``copy_in_rows``, the executor's path from a memory tier's rows)
    #: moves a whole batch in one native call (``_native.run_copy``): the executor
    #: shares it between its copy threads rather than splitting the blocks.
    native_shared = True

    def __init__(self, layout: BlockLayout, num_blocks: int, capacity: int,
                 device: Any = "cpu", room: torch.Tensor | None = None) -> None:
        m = layout.model
        if capacity < num_blocks * layout.page_size:
            raise ValueError(f"capacity {capacity} tokens is less than {num_blocks} blocks")
        self.layout = layout
        self.num_blocks = num_blocks
        self._dtype = self.dtype = getattr(torch, m.dtype)
        shape = (m.num_layers, 2, 1, capacity, m.num_kv_heads, m.head_dim)
        if room is None:
            room = torch.empty(shape, dtype=self._dtype, device=device)
        elif room.dtype != self._dtype or tuple(room.shape[:3]) != shape[:3] \
                or tuple(room.shape[4:]) != shape[4:] or room.shape[3] < capacity \
                or not room.is_contiguous():
            raise LayoutError(f"room: expected a contiguous {m.dtype} tensor of at least "
                              f"{list(shape)}, got {room.dtype} {list(room.shape)}")
        #: ``[layers, 2, 1, capacity, kv_heads, head_dim]``, token-major.
        self.room = room

        self._views: RoomViews | None = None
        #: Copy the tier's rows (``copy_in_rows``) layer by layer: the first
        #: ``SYNC_LAYERS`` now, the others left for ``take_fill`` (a ``LayerFill``).
        self.layered = False
        self._later: LayerFill | None = None
        self._fill_with: tuple[Callable[[], None], Any, Callable[[LayerFill], None]] | None = None

    @classmethod
    def pooled(cls, layout: BlockLayout, num_blocks: int, room: torch.Tensor,
               views: RoomViews | None = None) -> CacheBlockDestination:
        """A destination over ``room``, a pool's room made for ``layout`` and at least
        ``num_blocks`` blocks long: ``__init__`` without its checks of the room (each a
        torch call on the request path). ``views``, the room's ``room_views`` the pool
        made once, spare ``kv_views`` making them again."""
        self = cls.__new__(cls)
        self.layout = layout
        self.num_blocks = num_blocks
        self._dtype = self.dtype = getattr(torch, layout.model.dtype)
        self.room = room
        self._views = views
        self.layered = False
        self._later = None
        self._fill_with = None
        return self

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        """Write kvbm blocks ``src`` into the room as blocks ``indices`` of the prefix."""
        # The manager may call from its copy threads, where the caller's inference mode
        # (thread-local) is off; updating an inference tensor there would raise.
        with torch.inference_mode():
            self._copy_in(indices, src)

    def _copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        m = self.layout.model
        p = self.layout.page_size
        if len(indices) != len(src):
            raise LayoutError(f"src: expected {len(indices)} buffers, got {len(src)}")
        blocks = self._blocks(indices)
        runs = _native.copy_runs()
        sp = _addresses(src, self.layout.bytes_per_block) \
            if runs is not None and indices and self.room.device.type == "cpu" else None
        if runs is not None and sp is not None:
            self._native_in(runs, blocks, sp)
            return
        for b, s in zip(indices, src, strict=True):
            blk = torch.from_numpy(s).view(self._dtype).view(
                m.num_layers, 2, p, m.num_kv_heads, m.head_dim
            )
            self.room[:, :, 0, b * p : (b + 1) * p].copy_(blk)

    def copy_in_rows(self, indices: Sequence[int], rows: np.ndarray, at: Sequence[int]) -> None:
        """Write row ``at[i]`` of ``rows`` (a tier's slots, ``[slots, bytes_per_block]``
        uint8, C-contiguous) into the room as block ``indices[i]`` of the prefix.

        ``copy_in`` without a view per block: each block's address is the rows' base plus
        its row number times the row stride (one numpy expression), so a load of 512
        blocks makes no Python call per block (the executor's path for a memory tier).
        """
        v = self._views
        if v is not None and v.cpu and not self.layered and self._table_in(v, indices, rows, at):
            return
        r = _native.row_numbers(rows, at, len(indices), self.layout.bytes_per_block)
        runs = _native.copy_runs()
        if runs is None or not r.size or self.room.device.type != "cpu":
            self.copy_in(indices, [rows[i] for i in r.tolist()])
            return
        sp = r * rows.strides[0]  # a new array: ``at`` may be the caller's
        sp += _native.address(rows)
        if self.layered and self._later is None:
            # The rows stay where they are while the match's pins are held (the fill
            # gives them back): their copy can run after this call returns.
            self._layered_in(runs, self._blocks(indices), sp)
            return
        self._native_in(runs, self._blocks(indices), sp)

    def _table_in(self, v: RoomViews, indices: Sequence[int], rows: np.ndarray,
                  at: Sequence[int]) -> bool:
        """``copy_in_rows`` of a pooled host room by the compiled table (``_table``):
        the address tables of the lists ``indices`` and ``at`` in one C call, then the
        copy as ``_native_in``. False (nothing copied) where it does not apply or a
        number is off: the numpy path then copies, or names the bad value."""
        fn = _table.load()
        runs = _native.copy_runs()
        n = len(indices)
        bpb = self.layout.bytes_per_block
        if fn is None or runs is None or not n or type(rows) is not np.ndarray \
                or rows.ndim != 2 or rows.dtype != np.uint8 or rows.shape[1] != bpb \
                or not rows.flags.c_contiguous:
            return False
        lk = len(v.lk)
        part = bpb // lk
        tab = np.empty((2, n * lk), dtype=np.int64)
        d = _native.address(tab)
        if fn(indices, at, n, self.num_blocks, rows.shape[0], _native.address(rows),
              rows.strides[0], v.at_addr, lk, part, d, d + 8 * n * lk):
            return False
        _native.run_copy(runs, n * lk, tab[0], tab[1], part)
        return True

    def _layered_in(self, runs: _native.RunCopy, blocks: np.ndarray, sp: np.ndarray) -> None:
        """``_native_in`` in layer order: layers ``< SYNC_LAYERS`` now, shared with the
        copy threads of the caller's ``share``; the rest kept as a ``LayerFill``."""
        v = self._views if self._views is not None else room_views(self.room)
        part = self.layout.bytes_per_block // len(v.lk)
        # [layer × K|V, block]: a layer's runs are two consecutive rows of the table.
        d = np.add.outer(v.at, blocks * part)
        s_ = np.add.outer(v.lk * part, sp)
        first = min(_fill.SYNC_LAYERS, self.layout.model.num_layers)
        n = 2 * first * len(blocks)
        _native.run_copy(runs, n, d[: 2 * first].ravel(), s_[: 2 * first].ravel(), part)
        jobs = [(d[2 * li: 2 * li + 2].ravel(), s_[2 * li: 2 * li + 2].ravel())
                for li in range(first, self.layout.model.num_layers)]
        if not jobs:
            return
        fill = LayerFill(first, self.layout.model.num_layers, runs, part, jobs,
                         getattr(_native._par, "v", None))
        self._later = fill
        if self._fill_with is not None:
            # Started here, so the other layers copy while the executor and the
            # manager finish this load's bookkeeping.
            then, hold, start = self._fill_with
            fill.then(then)
            fill.hold(hold)
            start(fill)

    def fill_with(self, then: Callable[[], None], hold: Any,
                  start: Callable[[LayerFill], None]) -> None:
        """A layered copy's fill runs ``then`` after its last layer (before marking it
        done), keeps ``hold`` until it is over, and is started by ``start(fill)`` as
        soon as its first layers are copied (else it waits for ``take_fill``'s caller)."""
        self._fill_with = (then, hold, start)

    def take_fill(self) -> LayerFill | None:
        """The layers ``copy_in_rows`` left to copy (None when it copied all), once."""
        fill, self._later = self._later, None
        return fill

    def _blocks(self, indices: Sequence[int]) -> np.ndarray:
        """``indices`` as int64, each checked to lie within the room's blocks."""
        blocks = np.asarray(indices, dtype=np.int64)
        if blocks.size and umax(blocks) >= self.num_blocks:
            bad = next(int(b) for b in blocks if not 0 <= b < self.num_blocks)
            raise LayoutError(f"block index {bad} is out of range [0, {self.num_blocks})")
        return blocks

    def _native_in(self, runs: _native.RunCopy, blocks: np.ndarray, sp: np.ndarray) -> None:
        """Blocks ``blocks`` from the kvbm blocks at addresses ``sp``, in one native call.

        Block b's layer l K (or V) is one contiguous run in both: one call moves every
        block's 2 × layers runs, the GIL released, shared with the copy threads inside
        ``_native.share``. The room's side of the address table is the pool's
        (``RoomViews.at``): per load, one outer sum each way.
        """
        v = self._views if self._views is not None else room_views(self.room)
        part = self.layout.bytes_per_block // len(v.lk)  # one layer's K (or V) of a block
        d = np.add.outer(blocks * part, v.at).ravel()
        s_ = np.add.outer(sp, v.lk * part).ravel()
        shared = getattr(_native, "run_copy", None)
        if shared is not None:
            shared(runs, len(d), d, s_, part)
        else:
            runs(len(d), _native.address(d), _native.address(s_), part)

    def kv_room(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s key and value room as ``[1, kv_heads, capacity, head_dim]`` views."""
        return self.room[layer, 0].transpose(1, 2), self.room[layer, 1].transpose(1, 2)

    def kv_views(self, tokens: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                             list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every layer's ``kv_room``, and the views of its first ``tokens`` tokens (empty
        when ``tokens`` is 0), from one transpose.

        One transpose, one slice and ``layers + 1`` unbinds each, where ``kv_room`` per
        layer takes four ops and a slice two more: on the request path each torch call
        costs tens of microseconds in caches the model's forward just filled.
        """
        v = self._views if self._views is not None else room_views(self.room)
        return v.pairs, (_layer_pairs(v.t[:, :, :, :, :tokens]) if tokens else [])

"""The native plan of an engine's CPU tensors: where every contiguous run of a (block,
layer) slice lies, and the one-call copies of a batch (``LayerSeparateBlocks``)."""

from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _native


class RunPlan:
    """Where every contiguous run of a (block, layer) slice lies, for one native call a batch.

    Layer ``l`` of block ``b`` starts at ``base[l] + b * stride[l]`` in the engine's
    memory; its runs at ``eoff[l]`` from there (ascending), each ``run`` bytes, and at
    ``l * bytes_per_layer + hoff[l]`` in kvbm's contiguous block buffer. ``layers``
    lists the layers by address. The tables of a batch are built by one native call
    (``_native.block_table``) in the engine's address order, from the block ids and the
    buffers' addresses: no Python per block or run.
    """

    __slots__ = ("at", "bpl", "fn", "keep", "layer_major", "layers", "local", "nl", "num_runs",
                 "rows", "rows_fn", "run", "table")

    def __init__(self, fn: _native.RunCopy, table: _native.BlockTable, run: int,
                 base: np.ndarray, stride: np.ndarray, offsets: np.ndarray,
                 bytes_per_layer: int, keep: list[np.ndarray]) -> None:
        self.fn = fn
        self.table = table
        self.run = run
        self.bpl = bytes_per_layer
        self.nl = len(base)
        self.num_runs = offsets.shape[1]
        order = np.argsort(offsets, axis=1, kind="stable")
        eoff = np.ascontiguousarray(np.take_along_axis(offsets, order, axis=1), dtype=np.int64)
        hoff = np.ascontiguousarray(order * run, dtype=np.int64)
        self.layers = np.argsort(base, kind="stable").astype(np.int64)
        nb = max(1, int(keep[0].shape[0]))
        lo = base + eoff[:, 0]
        hi = base + (nb - 1) * stride + eoff[:, -1] + run
        srt = self.layers
        # Layer-major only where each layer's tensor is a region of its own (per-layer
        # tensors): walking layer by layer is then walking memory upwards.
        self.layer_major = bool((stride > 0).all() and (hi[srt][:-1] <= lo[srt][1:]).all())
        base = np.ascontiguousarray(base, dtype=np.int64)
        stride = np.ascontiguousarray(stride, dtype=np.int64)
        self.keep = [*keep, base, stride, eoff, hoff, self.layers]  # memory the addresses name
        self.at = tuple(_native.address(x) for x in (base, stride, eoff, hoff, self.layers))
        self.rows_fn = _native.rows_table()
        #: The last row array checked (and its address, shape, row stride): a host tier
        #: passes the same arena each call.
        self.rows: tuple[np.ndarray, int, tuple[int, ...], int] | None = None
        #: Each calling thread's address tables (grown as needed, reused: a helper that
        #: starts after its batch is done claims no chunk and reads no table).
        self.local = threading.local()

    @classmethod
    def build(cls, layers: list[np.ndarray], bytes_per_layer: int,
              min_run: int) -> RunPlan | None:
        """The plan, or None where numpy copies: no native loop, or runs under ``min_run``
        bytes, or layers whose runs differ."""
        fn = _native.copy_runs()
        table = _native.block_table()
        if fn is None or table is None or not layers or layers[0].shape[0] == 0:
            return None
        tables = [_native.run_table(t[0]) for t in layers]
        run = tables[0][0]
        if run < min_run or any(r != run or len(o) != len(tables[0][1])
                                        for r, o in tables):
            return None
        if run * len(tables[0][1]) != bytes_per_layer:
            return None  # not one layer's bytes exactly: leave it to numpy
        base = np.array([_native.address(t) for t in layers], dtype=np.int64)
        stride = np.array([t.strides[0] for t in layers], dtype=np.int64)
        offsets = np.stack([o for _, o in tables])
        return cls(fn, table, run, base, stride, offsets, bytes_per_layer, list(layers))

    def copy(self, idx: list[int], bufs: list[np.ndarray], l0: int, l1: int, out: bool,
             order: bool) -> None:
        """Engine blocks ``idx`` (layers ``[l0, l1)``) to ``bufs`` (``out``) or back."""
        n = len(idx)
        bp = np.fromiter((_native.address(x) for x in bufs), dtype=np.int64, count=n)
        self.copy_at(np.asarray(idx, dtype=np.int64), bp, l0, l1, out, order)

    def copy_at(self, blocks: np.ndarray, bp: np.ndarray, l0: int, l1: int, out: bool,
                order: bool) -> None:
        """Engine blocks ``blocks`` (int64, checked) to the whole-block buffers at addresses
        ``bp`` (``out``) or back, layers ``[l0, l1)``."""
        n = len(blocks)
        if order:  # any order moves the same bytes: each block keeps its buffer
            srt = np.argsort(blocks, kind="stable")
            blocks, bp = blocks[srt], bp[srt]
            layer_major = self.layer_major
        else:
            blocks = np.ascontiguousarray(blocks, dtype=np.int64)
            layer_major = False
        layers = self.layers if l1 - l0 == self.nl else np.arange(l0, l1, dtype=np.int64)
        m = n * len(layers) * self.num_runs
        eng = np.empty(m, dtype=np.int64)
        host = np.empty(m, dtype=np.int64)
        base, stride, eoff, hoff, _ = self.at
        address = _native.address
        self.table(n, address(blocks), address(bp), len(layers), address(layers), base, stride,
                   self.num_runs, eoff, hoff, self.bpl, int(layer_major), address(eng),
                   address(host))
        dst, src = (host, eng) if out else (eng, host)
        _native.run_copy(self.fn, m, dst, src, self.run)

    def copy_rows(self, indices: Sequence[int], rows: Any, at: Sequence[int], num_blocks: int,
                  out: bool, unique: bool, order: bool) -> bool:
        """Every layer of engine block ``indices[i]`` to row ``at[i]`` of ``rows`` (``out``)
        or back, checked and tabled by one native call (``kvbm_rows_table``), then one
        shared copy: no numpy call per check, no sort or gather in numpy, the tables'
        memory reused. False with nothing copied where an argument is not in that call's
        form or fails its checks (the caller's path then checks, and names the value)."""
        fn = self.rows_fn
        got = self.rows
        if got is None or got[0] is not rows or rows.shape != got[2]:
            got = self._check_rows(rows)  # (a shape assigned in place is checked again)
        if fn is None or got is None or (out and not rows.flags.writeable):
            return False
        try:  # lists of ints (what the executor passes): a plain C loop, no numpy
            b = array("q", indices)
            r = array("q", at)
        except (TypeError, OverflowError, ValueError):
            return False
        n = len(b)
        if not n or len(r) != n:
            return False
        m = n * self.nl * self.num_runs
        loc = self.local
        tab = getattr(loc, "tab", None)
        if tab is None or len(tab) < 2 * m + 4 * n:
            tab = loc.tab = np.empty(2 * m + 4 * n, dtype=np.int64)
            loc.at = _native.address(tab)
        t: int = loc.at
        seen = None
        if unique and n > 1:  # zero between calls: the C call clears what it sets
            if getattr(loc, "seen_n", -1) != num_blocks:
                loc.seen_buf = np.zeros(num_blocks, dtype=np.uint8)
                loc.seen = _native.address(loc.seen_buf)
                loc.seen_n = num_blocks
            seen = loc.seen
        base, stride, eoff, hoff, layers = self.at
        if fn(n, b.buffer_info()[0], num_blocks, r.buffer_info()[0], got[2][0], seen, got[1],
              got[3], t + 16 * m, int(order), self.nl, layers, base, stride, self.num_runs, eoff,
              hoff, self.bpl, int(self.layer_major), t, t + 8 * m):
            return False
        eng, host = tab[:m], tab[m:2 * m]
        dst, src = (host, eng) if out else (eng, host)
        _native.run_copy(self.fn, m, dst, src, self.run)
        return True

    def _check_rows(self, rows: Any) -> tuple[np.ndarray, int, tuple[int, ...], int] | None:
        """``rows`` as the one call takes them (C-contiguous uint8 ``[rows, block bytes]``),
        with its address, shape and row stride, kept for the next call; None otherwise."""
        if (not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2
                or rows.shape[1] != self.bpl * self.nl or not rows.flags.c_contiguous):
            return None
        got = (rows, _native.address(rows), rows.shape, int(rows.strides[0]))
        self.rows = got
        return got

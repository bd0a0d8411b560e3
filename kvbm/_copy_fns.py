"""The executor's copy functions: how a batch's bytes move between an engine's blocks
and a tier's memory (views of each block, a tier's rows by row number in one native
call, or a staged buffer), and which of them the native loop splits over the copy
threads. Plain functions of the engine and the tier, kept apart from the executor's
scheduling (``kvbm.executor``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .engine_blocks import _native
from .engine_blocks._native import copy_pairs
from .errors import LayoutError
from .layout import ContiguousBlocks


def _views_of(dest: Any, indices: Sequence[int]) -> list[np.ndarray] | None:
    """Writable views of an engine destination's blocks, where it offers them (plain memory)."""
    views = getattr(dest, "views", None)
    return views(indices) if callable(views) else None


class _Direct:
    """A block read straight into the destination's memory: nothing left to copy."""

    __slots__ = ("buf",)

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf


#: A block copied into the destination from a tier's rows (``_rows_fn``): no buffer
#: of it is kept (never promoted: those blocks take the path with views).
_COPIED = _Direct(np.empty(0, dtype=np.uint8))


def _rows_fn(engine: Any, out: bool) -> Callable[[Sequence[int], np.ndarray, Sequence[int]],
                                                 None] | None:
    """``fn(indices, rows, at)`` copying engine block ``indices[i]`` to (``out``) or from
    row ``at[i]`` of a tier's rows in one native call: the adapter's ``copy_out_rows`` /
    ``copy_in_rows``, or ``ContiguousBlocks``' rows; None where the engine offers no such
    copy (or there is no native loop): the caller copies through views."""
    if _native.copy_runs() is None:
        return None
    if isinstance(engine, ContiguousBlocks):
        return functools.partial(_contiguous_rows, engine, out)
    if not getattr(engine, "native_shared", False):
        return None
    fn = getattr(engine, "copy_out_rows" if out else "copy_in_rows", None)
    return fn if callable(fn) else None


def _contiguous_rows(blocks: ContiguousBlocks, out: bool, indices: Sequence[int],
                     rows: np.ndarray, at: Sequence[int]) -> None:
    """``ContiguousBlocks.copy_out`` / ``copy_in`` into or from rows ``at`` of ``rows``."""
    arr = blocks.array
    idx = np.asarray(indices, dtype=np.int64)
    r = np.asarray(at, dtype=np.int64)
    n = len(arr)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = next(i for i in idx.tolist() if not 0 <= i < n)
        raise LayoutError(f"block index {bad} is out of range [0, {n})")
    if (rows.shape[1] != arr.shape[1] or not arr.flags.c_contiguous
            or not rows.flags.c_contiguous or not (rows if out else arr).flags.writeable):
        views = [rows[i] for i in r.tolist()]
        if out:
            blocks.copy_out(indices, views)
        else:
            blocks.copy_in(indices, views)
        return
    if out:
        _native.copy_rows_at(rows, r, arr, idx)
    else:
        _native.copy_rows_at(arr, idx, rows, r)


def _raw(s: Any) -> np.ndarray:
    return s.buf if isinstance(s, _Direct) else s


def _copy_from(src: Sequence[np.ndarray]) -> Callable[[Sequence[int], Sequence[np.ndarray]], None]:
    """A ``split_copy`` function that copies ``src[i]`` into each given buffer."""

    def fn(idx: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        copy_pairs(dst, [src[i] for i in idx])  # one native call, the GIL released

    fn.native_shared = True  # type: ignore[attr-defined]
    return fn


def _shares(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` copies through the native loop in one call (``copy_pairs`` or the
    adapter's run plan), so ``_native.share`` splits it across the copy threads."""
    if _native.copy_runs() is None:
        return False
    if getattr(fn, "native_shared", False):
        return True
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, ContiguousBlocks):  # copy_out / copy_in: one copy_pairs call
        return True
    return bool(getattr(owner, "native_shared", False))

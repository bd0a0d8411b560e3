"""Block layouts: how one block's bytes are arranged, and views onto engine tensors.

A block holds ``num_layers × outer_dim × page_size × inner_dim`` elements
(``outer_dim`` is 2 for K and V, 1 for MLA; ``inner_dim = num_kv_heads × head_dim``).
Tiers store blocks *fully contiguous*: one region of ``bytes_per_block`` bytes with
the layers in order. Engines hold them *layer separate*: one tensor per layer, as
vLLM allocates ``[2, num_blocks, page, heads, head_dim]`` (or ``[num_blocks, 2, …]``).
``LayerSeparateBlocks`` gathers blocks from such tensors into contiguous regions and
scatters them back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np

from .errors import LayoutError

DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


@dataclass(frozen=True)
class ModelSpec:
    """The part of a model that fixes the shape of its KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    outer_dim: int = 2
    name: str = "model"

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise LayoutError(f"model.{key}: expected a positive integer, got {v!r}")
        if self.outer_dim not in (1, 2):
            raise LayoutError(
                f"model.outer_dim: expected 2 (K and V) or 1 (MLA), got {self.outer_dim!r}"
            )
        if self.dtype not in DTYPE_SIZES:
            raise LayoutError(
                f"model.dtype: {self.dtype!r} is not supported; use one of {sorted(DTYPE_SIZES)}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class BlockLayout:
    """The shape of one block: a model's KV for ``page_size`` tokens."""

    model: ModelSpec
    page_size: int
    kind: Literal["fully_contiguous", "layer_separate"] = "fully_contiguous"

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size <= 0:
            raise LayoutError(f"page_size: expected a positive integer, got {self.page_size!r}")

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """``(num_layers, outer_dim, page_size, inner_dim)`` of one contiguous block."""
        m = self.model
        return (m.num_layers, m.outer_dim, self.page_size, m.inner_dim)

    @property
    def bytes_per_layer(self) -> int:
        m = self.model
        return m.outer_dim * self.page_size * m.inner_dim * m.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.model.num_layers * self.bytes_per_layer

    @property
    def digest(self) -> str:
        """A stable 16-hex-digit name of the byte arrangement (not of the model's weights).

        The kind is left out on purpose: both kinds store the same contiguous bytes in a
        tier; they differ only in how the engine holds them.
        """
        d = asdict(self.model)
        d.pop("name")
        d["page_size"] = self.page_size
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


class BlockSource(Protocol):
    """Where offloaded blocks come from: copies block ``indices[i]`` into ``dst[i]``."""

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None: ...


class BlockDestination(Protocol):
    """Where onboarded blocks go: copies ``src[i]`` into block ``indices[i]``.

    A destination in plain host memory may also offer ``views(indices)``: writable
    ``uint8`` arrays of its blocks, which lower tiers then read into directly.
    """

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None: ...


class ContiguousBlocks:
    """A caller's buffer of whole blocks: a ``uint8`` array ``[n, bytes_per_block]``.

    Serves as both a source and a destination; block ``i`` is row ``i``.
    """

    def __init__(self, array: np.ndarray, layout: BlockLayout) -> None:
        if not isinstance(array, np.ndarray):
            raise LayoutError(f"blocks: expected a numpy uint8 array, got {type(array).__name__}")
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != layout.bytes_per_block:
            raise LayoutError(
                f"blocks: expected uint8 [n, {layout.bytes_per_block}], "
                f"got {array.dtype} {list(array.shape)}"
            )
        self.array = array
        self.layout = layout

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def _check(self, indices: Sequence[int]) -> None:
        n = len(self)
        for i in indices:
            if not 0 <= i < n:
                raise LayoutError(f"block index {i} is out of range [0, {n})")

    def views(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Writable rows for ``indices``: lower tiers read into them with no staging copy."""
        self._check(indices)
        return [self.array[i] for i in indices]

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        self._check(indices)
        for i, d in zip(indices, dst):
            np.copyto(d, self.array[i])

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        self._check(indices)
        for i, s in zip(indices, src):
            np.copyto(self.array[i], s)


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise LayoutError(
            "layer-separate blocks need torch: pip install 'kvbm[torch]'"
        ) from e
    return torch


class LayerSeparateBlocks:
    """An engine's per-layer KV tensors, addressed by the engine's block ids.

    Each layer tensor is ``[outer, num_blocks, page, heads, head_dim]`` (vLLM's
    ``[2, num_blocks, …]``) or ``[num_blocks, outer, page, heads, head_dim]``; which one
    is detected from the shape and can be forced with ``block_dim``. ``copy_out``
    gathers a block's slices from every layer into one contiguous region in the order
    of ``BlockLayout.block_shape``; ``copy_in`` scatters it back.
    """

    def __init__(
        self,
        kv_caches: Sequence[Any],
        layout: BlockLayout,
        block_dim: int | None = None,
    ) -> None:
        torch = _torch()
        m = layout.model
        if len(kv_caches) != m.num_layers:
            raise LayoutError(
                f"kv_caches: expected {m.num_layers} layer tensors, got {len(kv_caches)}"
            )
        want_dtype = getattr(torch, m.dtype)
        first = kv_caches[0]
        if block_dim is None:
            block_dim = self._detect_block_dim(first, layout)
        self.block_dim = block_dim
        self.num_blocks = int(first.shape[block_dim])
        per_block = [m.outer_dim, layout.page_size, m.num_kv_heads, m.head_dim]
        want = list(per_block)
        want.insert(block_dim, self.num_blocks)
        self._layers = []
        for li, t in enumerate(kv_caches):
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"kv_caches[{li}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != want_dtype:
                raise LayoutError(f"kv_caches[{li}]: expected dtype {m.dtype}, got {t.dtype}")
            if list(t.shape) != want:
                raise LayoutError(f"kv_caches[{li}]: expected shape {want}, got {list(t.shape)}")
            # View every layer as [num_blocks, outer, page, inner] so one block of one
            # layer is t[b] regardless of which dim the engine put first.
            v = t if block_dim == 0 else t.transpose(0, 1)
            self._layers.append(v.reshape(self.num_blocks, m.outer_dim, layout.page_size, -1)
                                if v.is_contiguous() else v.flatten(3))
        self.layout = layout
        self.device = first.device
        self._torch = torch
        self._dtype = want_dtype

    @staticmethod
    def _detect_block_dim(t: Any, layout: BlockLayout) -> int:
        m = layout.model
        if t.dim() != 5:
            raise LayoutError(
                f"kv_caches[0]: expected 5 dims [outer, blocks, page, heads, head_dim] or "
                f"[blocks, outer, page, heads, head_dim], got shape {list(t.shape)}"
            )
        tail = [layout.page_size, m.num_kv_heads, m.head_dim]
        if list(t.shape[2:]) != tail:
            raise LayoutError(
                f"kv_caches[0]: expected trailing dims [page={layout.page_size}, "
                f"heads={m.num_kv_heads}, head_dim={m.head_dim}], got {list(t.shape[2:])}"
            )
        if t.shape[0] == m.outer_dim and t.shape[1] != m.outer_dim:
            return 1
        if t.shape[1] == m.outer_dim:
            return 0
        raise LayoutError(
            f"kv_caches[0]: neither dim 0 nor dim 1 equals outer_dim={m.outer_dim} "
            f"in shape {list(t.shape)}"
        )

    def _check(self, indices: Sequence[int]) -> None:
        for b in indices:
            if not 0 <= b < self.num_blocks:
                raise LayoutError(f"block id {b} is out of range [0, {self.num_blocks})")

    def _block_view(self, buf: np.ndarray) -> Any:
        torch = self._torch
        m = self.layout.model
        return torch.from_numpy(buf).view(self._dtype).view(
            m.num_layers, m.outer_dim, self.layout.page_size, m.inner_dim
        )

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        self._check(indices)
        for b, d in zip(indices, dst):
            out = self._block_view(d)
            for li, layer in enumerate(self._layers):
                out[li].copy_(layer[b])

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        self._check(indices)
        for b, s in zip(indices, src):
            inp = self._block_view(s)
            for li, layer in enumerate(self._layers):
                layer[b].copy_(inp[li])


def aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    """A zeroed ``uint8`` array of ``nbytes`` whose first byte is ``align``-aligned.

    Anonymous ``mmap`` memory is page-aligned and zero-filled; callers touch it to
    fault pages in up front when that matters.
    """
    import mmap

    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    size = -(-nbytes // align) * align
    mm = mmap.mmap(-1, size)
    arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes)
    assert arr.ctypes.data % align == 0, "anonymous mmap is page-aligned"
    return arr

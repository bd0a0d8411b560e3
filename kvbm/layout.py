"""Block layouts: how one block's bytes are arranged, and views onto engine tensors.

A block holds ``num_layers × outer_dim × page_size × inner_dim`` elements
(``outer_dim`` is 2 for K and V, 1 for MLA; ``inner_dim = num_kv_heads × head_dim``).
Tiers store blocks *fully contiguous*: one region of ``bytes_per_block`` bytes with
the layers in order. Engines hold them *layer separate*: one tensor per layer, as
vLLM allocates them (``[2, num_blocks, page, heads, head_dim]`` before 0.33, the
logical ``[num_blocks, heads, tokens, K|V]`` since). ``LayerSeparateBlocks``
(``kvbm.engine_blocks``, re-exported here) gathers blocks from such tensors into
contiguous regions and scatters them back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

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
    #: How the engine itself arranges a block's bytes where kvbm copies them opaquely
    #: (engine, attention backend, kernel variant and its tiling, per-layer shape),
    #: e.g. ``"vllm:CPU_ATTN:amx:[2, 128, 256]"``; empty when kvbm's copies turn the
    #: engine's tensors into the canonical order itself. Part of ``digest``, so two
    #: engines that lay a block out differently never read each other's blocks.
    physical: str = ""

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
        if self.physical:
            # Only when set: the digests of layouts without one stay what they were,
            # so blocks stored before the field existed are still found.
            d["physical"] = self.physical
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
        """Rows for ``indices``: lower tiers read into them, and a disk-first offload
        writes from them, with no staging copy."""
        self._check(indices)
        return [self.array[i] for i in indices]

    def copy_out(self, indices: Sequence[int], dst: Sequence[np.ndarray]) -> None:
        from .engine_blocks._native import copy_pairs  # one native call (streams when large)

        self._check(indices)
        copy_pairs(dst, [self.array[i] for i in indices])

    def copy_in(self, indices: Sequence[int], src: Sequence[np.ndarray]) -> None:
        from .engine_blocks._native import copy_pairs

        self._check(indices)
        copy_pairs([self.array[i] for i in indices], src)


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


# The engine-tensor adapter lives in kvbm.engine_blocks (it needs BlockLayout, defined
# above); re-exported so ``from kvbm.layout import LayerSeparateBlocks`` keeps working.
from .engine_blocks import LayerSeparateBlocks  # noqa: E402

__all__ = [
    "DTYPE_SIZES",
    "BlockDestination",
    "BlockLayout",
    "BlockSource",
    "ContiguousBlocks",
    "LayerSeparateBlocks",
    "ModelSpec",
    "aligned_empty",
]

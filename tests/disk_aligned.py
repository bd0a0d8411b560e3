"""Disk tiers of page-aligned blocks (the native I/O loop's), shared by the native-loop
and AIO tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvbm import BlockLayout, ModelSpec, Namespace
from kvbm.layout import aligned_empty
from kvbm.tier import TierContext
from kvbm_tiers_disk.config import DiskTierConfig
from kvbm_tiers_disk.format import HEADER_BYTES, unpack_header
from kvbm_tiers_disk.tier import DiskTier

from conftest import PAGE, SMALL_MODEL

# 2 x 2 x 4 x 128 x float32 = 8192 bytes: page-aligned blocks, the native loop's.
ALIGNED_MODEL = {**SMALL_MODEL, "head_dim": 64}


def make_tier(path: Path, n: int = 8, io_threads: int = 4, **keys: Any) -> DiskTier:
    """A recovered disk tier of ``n`` aligned blocks under ``path``."""
    layout = BlockLayout(ModelSpec(**ALIGNED_MODEL), PAGE)
    ns = Namespace(ALIGNED_MODEL["name"], layout.digest)
    cfg = DiskTierConfig(type="disk", name="disk", path=str(path), num_blocks=n,
                         io_threads=io_threads, **keys)
    t = DiskTier(cfg, TierContext("disk", ns, layout, n))
    t.recover()
    return t


def blocks(bb: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random blocks of ``bb`` bytes in one aligned arena."""
    arena = aligned_empty(n * bb).reshape(n, bb)
    arena[:] = np.random.default_rng(seed).integers(0, 256, arena.shape, dtype=np.uint8)
    return [arena[i] for i in range(n)]


def on_disk(t: DiskTier, slot: int) -> tuple[Any, bytes]:
    """The slot's header (None if invalid) and its data bytes, read from the file."""
    st, local = t._locate(slot)
    with open(st.path, "rb") as f:
        f.seek(t.geom.header_offset(local))
        h = unpack_header(memoryview(f.read(HEADER_BYTES)))
        return h, f.read(t.block_bytes)

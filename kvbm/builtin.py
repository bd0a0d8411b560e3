"""The core's own plugin: the LRU eviction policy and admit-all, always present."""

from __future__ import annotations

from .hookspecs import hookimpl
from .plugins import LayoutRegistry, PolicyRegistry


@hookimpl
def kvbm_register_policies(registry: PolicyRegistry) -> None:
    """LRU eviction and admit-all: what a tier uses when its config names nothing else."""
    registry.add("lru", kind="eviction", factory="kvbm.policy:LRUPolicy",
                 description="least recently used or released first")
    registry.add("all", kind="admission", factory="kvbm.policy:AdmitAll",
                 description="admit every block")


@hookimpl
def kvbm_register_layouts(registry: LayoutRegistry) -> None:
    """The core's portable layouts: contiguous arrays and per-layer torch tensors."""
    registry.add("contiguous", factory="kvbm.layout:ContiguousBlocks",
                 description="a uint8 array [n, bytes_per_block]")
    registry.add("layer_separate", factory="kvbm.layout:LayerSeparateBlocks", extra="torch",
                 requires=("torch",), description="one torch tensor per layer, as vLLM holds them")


"""kvbm's gpu tier plugin: engine KV tensors as blocks, device transfers, layer-wise onboard.

Public names (torch is imported only when one of the heavy ones is first used):

* ``register_kv_caches(kv_caches, layout, ...) -> DeviceBlocks`` — an engine's tensors
  (vLLM per-layer dict/list, TensorRT-LLM's pool, MLA) as blocks by block id;
* ``DeviceBlocks`` — ``copy_out`` / ``copy_in`` (kvbm's BlockSource/BlockDestination),
  ``onboard_layerwise``, ``allocate`` for a pool of our own;
* ``onboard_layerwise(manager, match, blocks, indices) -> LayerwiseOnboard`` — a
  manager onboard run layer by layer; ``handle.wait_for_layer(i)``;
* ``GpuTier`` — the ``gpu`` tier; ``GpuTierConfig`` and ``TransferConfig`` — its keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import GpuTierConfig, TransferConfig

if TYPE_CHECKING:
    from .blocks import DeviceBlocks, register_kv_caches
    from .layerwise import LayerwiseOnboard, onboard_layerwise
    from .tier import GpuTier

_LAZY = {
    "DeviceBlocks": "kvbm_tiers_gpu.blocks",
    "register_kv_caches": "kvbm_tiers_gpu.blocks",
    "onboard_layerwise": "kvbm_tiers_gpu.layerwise",
    "LayerwiseOnboard": "kvbm_tiers_gpu.layerwise",
    "GpuTier": "kvbm_tiers_gpu.tier",
}

__all__ = [
    "DeviceBlocks",
    "GpuTier",
    "GpuTierConfig",
    "LayerwiseOnboard",
    "TransferConfig",
    "onboard_layerwise",
    "register_kv_caches",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'kvbm_tiers_gpu' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)

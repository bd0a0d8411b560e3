"""kvbm's gpu tier plugin: device transfers for engine KV tensors, layer-wise onboard, the gpu tier.

Reading an engine's tensors is the core's job (``kvbm.engine_blocks``); this package
adds what a device needs. Public names (torch is imported only when one of the heavy
ones is first used):

* ``register_kv_caches(kv_caches, layout, ...) -> DeviceBlocks`` — an engine's tensors
  (vLLM per-layer dict/list of any version, TensorRT-LLM's pool, MLA) as blocks by id;
* ``DeviceBlocks`` — the core's ``LayerSeparateBlocks`` with CUDA streams, pinned
  staging, the gather strategy and CuPy copies; ``onboard_layerwise``; ``allocate``
  for a pool of our own; what ``kvbm.engine_blocks.engine_blocks`` returns on CUDA;
* ``onboard_layerwise(manager, match, blocks, indices) -> LayerwiseOnboard`` — a
  manager onboard run layer by layer; ``handle.wait_for_layer(i)``;
* ``GpuTier`` — the ``gpu`` tier; ``GpuTierConfig`` and ``TransferConfig`` — its keys.

Rooms: ``plugin.py`` (hooks; kvbm and the stdlib only), ``config.py``, ``blocks.py``
and ``tier.py`` (the main modules), ``layerwise.py``, and the private ``_device.py``
(streams, staging), ``_gather.py`` (the gather strategy), ``_cupy.py``.
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

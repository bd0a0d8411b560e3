"""Registers the ``gpu`` tier and the engine layouts. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.engine_blocks import accelerated_layout_name
from kvbm.hookspecs import hookimpl
from kvbm.plugins import LayoutRegistry, TierRegistry

from .config import GpuTierConfig


@hookimpl
def kvbm_register_tiers(registry: TierRegistry) -> None:
    """Add the ``gpu`` tier type."""
    registry.add(
        "gpu",
        factory="kvbm_tiers_gpu.tier:GpuTier",
        config_model=GpuTierConfig,
        extra="gpu",
        requires=("torch",),
        description="a pool of blocks in device memory (CPU memory without CUDA)",
        order=0,
    )


@hookimpl
def kvbm_register_layouts(registry: LayoutRegistry) -> None:
    """Add the engine layouts of vLLM, TensorRT-LLM and MLA models."""
    registry.add("vllm", factory="kvbm_tiers_gpu.blocks:vllm_blocks", extra="gpu",
                 requires=("torch",),
                 description="vLLM's per-layer tensors: 0.33's [blocks*ratio, heads, tokens, K|V], "
                             "or [2, blocks, page, heads, hd] / [blocks, 2, …] before")
    registry.add("trtllm", factory="kvbm_tiers_gpu.blocks:trtllm_blocks", extra="gpu",
                 requires=("torch",),
                 description="TensorRT-LLM's primary pool [blocks, layers, kv_factor, block_size]")
    registry.add("mla", factory="kvbm_tiers_gpu.blocks:mla_blocks", extra="gpu",
                 requires=("torch",),
                 description="MLA latent caches per layer [blocks, page, head_dim]")
    # What kvbm.engine_blocks.engine_blocks hands out for CUDA tensors.
    registry.add(accelerated_layout_name("cuda"), factory="kvbm_tiers_gpu.blocks:DeviceBlocks",
                 extra="gpu", requires=("torch",),
                 description="engine KV tensors on CUDA: copy streams, pinned staging, gathers")

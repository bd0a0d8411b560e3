"""What vLLM's configuration fixes for kvbm: the per-rank block layout, the settings, the namespace.

The model part of the layout (layers, KV heads per rank, head size, dtype, page size)
always comes from vLLM's KV-cache spec; a kvbm config that names a different one is
a ``ConfigError``. The rest of the settings come from ``kv_connector_extra_config``
(``{"kvbm": {...}}`` or ``{"kvbm_config": "/path/kvbm.yaml"}``) or kvbm's environment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.config import KvbmSettings, load_settings
from kvbm.errors import LayoutError
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.ranks import engine_settings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

log = logging.getLogger("kvbm.vllm")

_TORCH_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8",
                      "uint8")


def _dtype_name(dtype: Any) -> str | None:
    name = str(dtype).replace("torch.", "")
    return name if name in _TORCH_DTYPE_NAMES else None


@dataclass(frozen=True)
class EngineLayout:
    """What vLLM's KV-cache spec fixes: the per-rank block layout and the layer order."""

    layout: BlockLayout
    layer_names: tuple[str, ...]


def engine_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> EngineLayout:
    """The per-rank block layout of vLLM's KV cache; ``LayoutError`` when kvbm cannot hold it.

    kvbm supports one KV-cache group of full attention (MHA/GQA with equal K and V head
    sizes, or MLA), unquantized. Hybrid models (sliding window groups, Mamba), packed
    or quantized pages are refused with the reason.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        raise LayoutError(
            f"vLLM KV cache has {len(groups)} groups ({', '.join(kinds)}): a hybrid-attention "
            "model, which kvbm does not support; run it without kvbm or with "
            "--disable-hybrid-kv-cache-manager"
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, FullAttentionSpec):
        raise LayoutError(
            f"vLLM KV-cache spec {type(spec).__name__} is not full attention; kvbm supports "
            "FullAttentionSpec and MLAAttentionSpec"
        )
    for attr, ok in (("num_head_slots", None), ("state_content_bytes", None),
                     ("page_size_padded", None)):
        if getattr(spec, attr, None) is not ok:
            raise LayoutError(
                f"vLLM KV-cache spec has {attr}={getattr(spec, attr)!r} (packed pages); "
                "kvbm supports plain [blocks, heads, tokens, K|V] pages"
            )
    if getattr(spec, "tokens_per_state", 1) != 1:
        raise LayoutError(f"vLLM KV-cache spec stores {spec.tokens_per_state} tokens per "
                          "state; kvbm supports one token per state")
    quant = getattr(spec, "kv_quant_mode", None)
    if quant is not None and getattr(quant, "name", "NONE") != "NONE":
        raise LayoutError(f"vLLM KV cache is quantized ({quant.name}); kvbm supports "
                          "unquantized KV caches only")
    dtype = _dtype_name(spec.dtype)
    if dtype is None:
        raise LayoutError(f"vLLM KV-cache dtype {spec.dtype} is not supported; use one of "
                          f"{sorted(_TORCH_DTYPE_NAMES)}")
    if isinstance(spec, MLAAttentionSpec):
        model = ModelSpec(num_layers=len(groups[0].layer_names), num_kv_heads=1,
                          head_dim=spec.head_size, dtype=dtype, outer_dim=1,
                          name=str(vllm_config.model_config.model))
    else:
        if spec.head_size_v != spec.head_size:
            raise LayoutError(f"vLLM KV cache has K head size {spec.head_size} and V head "
                              f"size {spec.head_size_v}; kvbm needs them equal")
        model = ModelSpec(num_layers=len(groups[0].layer_names),
                          num_kv_heads=spec.num_kv_heads, head_dim=spec.head_size,
                          dtype=dtype, outer_dim=2, name=str(vllm_config.model_config.model))
    return EngineLayout(BlockLayout(model, spec.block_size, kind="layer_separate"),
                        tuple(groups[0].layer_names))


def connector_settings(vllm_config: VllmConfig, eng: EngineLayout) -> KvbmSettings:
    """kvbm settings for this engine: the user's config with vLLM's layout filled in.

    The user's config is ``kv_connector_extra_config["kvbm"]`` (a dict of settings),
    else ``kv_connector_extra_config["kvbm_config"]`` (a YAML path), else kvbm's own
    environment (``KVBM_CONFIG``, ``KVBM_*``, ``DYN_KVBM_*``). A model or page size
    given there that disagrees with vLLM's is a ``ConfigError``.
    """
    ktc = vllm_config.kv_transfer_config
    extra = dict(getattr(ktc, "kv_connector_extra_config", None) or {})
    source: Any = extra.get("kvbm")
    if source is None:
        source = extra.get("kvbm_config")
    user = load_settings(source)
    tp = int(vllm_config.parallel_config.tensor_parallel_size)
    return engine_settings(user, eng.layout, tp, engine="vLLM's KV cache",
                           page_what="vLLM's block size",
                           page_fix=f"pass --block-size {user.page_size} to vLLM")


def physical_layout(vllm_config: VllmConfig, layer_names: Sequence[str],
                    kv_caches: Mapping[str, Any]) -> str:
    """How this engine lays a block's bytes out where kvbm cannot see it: the block identity.

    kvbm reads vLLM's KV tensors through their logical dims, but an attention kernel
    may tile a block's K and V inside them (vLLM's CPU backend: its ``amx`` and
    ``vec`` kernels differ, and ``vec`` transposes K). So the engine, the attention
    backend, the kernel variant (``layer.isa`` on CPU) and one layer's per-block
    shape and dtype name the bytes; this string goes into the layout digest of every
    block the worker stores. ``LayoutError`` when the layers disagree.
    """
    backends: set[str] = set()
    isas: set[str] = set()
    try:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

        layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase,  # type: ignore[type-abstract]
                                             list(layer_names))
        for layer in layers.values():
            backends.add(str(layer.get_attn_backend().get_name()))
            isa = getattr(layer, "isa", None)
            if isa is not None:
                isas.add(str(isa))
    except Exception as e:  # an older or newer vLLM without these names
        log.warning("kvbm: cannot read vLLM's attention backend (%s); blocks are shared only "
                    "with instances that cannot read it either", e)
    if len(backends) > 1 or len(isas) > 1:
        raise LayoutError(f"vLLM's attention layers use different backends or kernels "
                          f"({sorted(backends)} {sorted(isas)}); kvbm needs one per model")
    first = next(iter(kv_caches.values()))
    parts = ["vllm", backends.pop() if backends else "unknown"]
    if isas:
        parts.append(isas.pop())
    parts.append(str([int(d) for d in first.shape[1:]]))
    parts.append(str(first.dtype).replace("torch.", ""))
    return ":".join(parts)

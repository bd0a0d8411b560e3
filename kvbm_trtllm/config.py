"""What TensorRT-LLM's configuration and KV-cache pool fix for kvbm: ranks, layout, settings.

TRT-LLM hands the connector its ``TorchLlmArgs`` (both halves) and, on each worker, the
primary pool ``KVCacheManager.get_unique_primary_pool()``:
``[num_blocks, num_layers, kv_factor, tokens_per_block × kv_heads × head_dim]``. The
block layout comes from that pool and ``kv_cache_config.tokens_per_block``; the split
of the last dim into heads and head size from the kvbm config's ``model`` or the
model folder's ``config.json``. Without either, kvbm stores each layer's bytes in the
engine's own order, and the block identity (``BlockLayout.physical``) says so.

kvbm's settings come from its environment, as Dynamo's do (``DYN_KVBM_*``, or
``KVBM_CONFIG`` / ``KVBM_*``): TRT-LLM's ``kv_connector_config`` takes no extra keys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kvbm.config import KvbmSettings
from kvbm.errors import ConfigError, LayoutError
from kvbm.layout import BlockLayout, ModelSpec
from kvbm.ranks import engine_settings

log = logging.getLogger("kvbm.trtllm")

_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")

#: The order inside a block each TRT-LLM attention backend reads: the TRTLLM kernels
#: take ``[heads, tokens, head_dim]``, the others ``get_buffers(..., "NHD")``.
BACKEND_KV_LAYOUT: dict[str, Literal["NHD", "HND"]] = {
    "TRTLLM": "HND", "FLASHINFER": "NHD", "FLASHINFER_STAR_ATTENTION": "NHD", "VANILLA": "NHD",
}


@dataclass(frozen=True)
class Ranks:
    """This process's place among the engine's ranks (tensor parallelism only)."""

    rank: int
    tp_size: int


def ranks(llm_args: Any) -> Ranks:
    """The tensor-parallel rank and size from ``llm_args.parallel_config.to_mapping()``.

    TRT-LLM runs connectors under tensor parallelism only; a pipeline- or
    context-parallel mapping is a ``ConfigError``.
    """
    mapping = llm_args.parallel_config.to_mapping()
    for key in ("pp_size", "cp_size"):
        n = int(getattr(mapping, key, 1) or 1)
        if n > 1:
            raise ConfigError(f"TensorRT-LLM parallel_config: {key}={n}; kvbm's connector "
                              f"supports tensor parallelism only; set {key} to 1")
    tp = int(getattr(mapping, "tp_size", getattr(mapping, "world_size", 1)) or 1)
    rank = int(getattr(mapping, "tp_rank", getattr(mapping, "rank", 0)) or 0)
    return Ranks(rank, tp)


def tokens_per_block(llm_args: Any) -> int:
    """``kv_cache_config.tokens_per_block``: TRT-LLM's block size (its default, 32)."""
    kcc = getattr(llm_args, "kv_cache_config", None)
    n = getattr(kcc, "tokens_per_block", None)
    return int(n) if n else 32


def attention_backend(llm_args: Any) -> str:
    """TRT-LLM's attention backend name (``attn_backend``, default ``TRTLLM``)."""
    return str(getattr(llm_args, "attn_backend", None) or "TRTLLM").upper()


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise LayoutError(f"TensorRT-LLM KV-cache pool dtype {dtype} is not supported; kvbm "
                          f"reads {', '.join(_DTYPES)} (an NVFP4 cache is not)")
    return name


def _model_dir_heads(llm_args: Any, tp_size: int) -> tuple[int, int] | None:
    """(KV heads per rank, head size) from the model folder's ``config.json``, if any."""
    model = getattr(llm_args, "model", None)
    if model is None:
        return None
    path = Path(str(model)) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a hub name, or no readable config: the opaque form serves
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and "hidden_size" in cfg
                                 else None)
    if not (isinstance(kv, int) and isinstance(hd, int) and kv > 0 and hd > 0):
        return None
    # Fewer KV heads than ranks: TRT-LLM replicates one head per rank.
    return max(1, kv // tp_size), hd


@dataclass(frozen=True)
class PoolLayout:
    """How one rank's pool holds blocks: the layout kvbm stores, and the view it reads with."""

    layout: BlockLayout
    kv_layout: Literal["NHD", "HND"]
    num_blocks: int


def pool_layout(pool: Any, llm_args: Any, user: KvbmSettings) -> PoolLayout:
    """The block layout of TRT-LLM's primary pool; ``LayoutError`` when kvbm cannot read it."""
    shape = [int(d) for d in getattr(pool, "shape", ())]
    if len(shape) != 4:
        raise LayoutError(f"TensorRT-LLM KV-cache pool: expected 4 dims [blocks, layers, "
                          f"kv_factor, tokens*heads*head_dim], got shape {shape}")
    nb, layers, outer, inner = shape
    if outer not in (1, 2):
        raise LayoutError(f"TensorRT-LLM KV-cache pool: kv_factor {outer} is not 2 (K and V) "
                          "or 1 (MLA)")
    dtype = _dtype_name(pool.dtype)
    page = tokens_per_block(llm_args)
    if inner % page:
        raise LayoutError(f"TensorRT-LLM KV-cache pool: last dim {inner} is not a multiple of "
                          f"kv_cache_config.tokens_per_block={page}")
    per_token = inner // page
    backend = attention_backend(llm_args)
    order = BACKEND_KV_LAYOUT.get(backend)
    if order is None:
        raise LayoutError(f"TensorRT-LLM attention backend {backend!r}: kvbm knows how "
                          f"{', '.join(BACKEND_KV_LAYOUT)} lay out a block")
    tp = ranks(llm_args).tp_size
    if outer == 1:
        candidates = [(1, per_token)]  # MLA: one latent vector per token
    elif "model" in user.model_fields_set:
        um = user.model
        # The config may name the model's KV heads or one rank's share of them.
        candidates = [(max(1, um.num_kv_heads // tp), um.head_dim), (um.num_kv_heads, um.head_dim)]
    else:
        found = _model_dir_heads(llm_args, tp)
        candidates = [found] if found else []
    dims = next((d for d in candidates if d[0] * d[1] == per_token), None)
    kv_layout: Literal["NHD", "HND"] = order
    stored = "NHD"
    if dims is None and "model" in user.model_fields_set and outer == 2:
        um = user.model
        raise ConfigError(
            f"kvbm config key 'model': kv_heads={um.num_kv_heads} head_dim={um.head_dim} does "
            f"not match TensorRT-LLM's KV-cache pool ({per_token} values per token per rank at "
            f"tp {tp}); remove 'model' from the kvbm config or fix it")
    if dims is None:
        if candidates:
            log.warning("kvbm: %d KV heads x head size %d per rank does not fill TensorRT-LLM's "
                        "%d values per token; blocks are stored in the engine's own order",
                        candidates[0][0], candidates[0][1], per_token)
        # Heads unknown: each layer's bytes are kept in the backend's order as they are
        # (read through an NHD view of one "head"); the block identity names that order.
        dims, kv_layout, stored = (1, per_token), "NHD", f"raw-{order}"
    name = user.model.name if "model" in user.model_fields_set else str(
        getattr(llm_args, "model", "model"))
    model = ModelSpec(num_layers=layers, num_kv_heads=dims[0], head_dim=dims[1], dtype=dtype,
                      outer_dim=outer, name=name)
    physical = f"trtllm:{backend}:{stored}:{[layers, outer, inner]}:{dtype}"
    return PoolLayout(BlockLayout(model, page, kind="fully_contiguous", physical=physical),
                      kv_layout, nb)


def connector_settings(user: KvbmSettings, layout: BlockLayout, tp_size: int) -> KvbmSettings:
    """kvbm settings for this engine: the user's, with the pool's layout filled in.

    A ``model`` or ``page_size`` the user gave that disagrees with the pool is a
    ``ConfigError`` naming both.
    """
    return engine_settings(user, layout, tp_size, engine="TensorRT-LLM's KV-cache pool",
                           page_what="TensorRT-LLM's kv_cache_config.tokens_per_block",
                           page_fix="set tokens_per_block to it")


__all__ = ["BACKEND_KV_LAYOUT", "PoolLayout", "Ranks", "attention_backend", "connector_settings",
           "pool_layout", "ranks", "tokens_per_block"]

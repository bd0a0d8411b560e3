"""The base class of the backend and the v2 transfer types: SGLang's own when SGLang is
installed (its factory checks the subclass; its cache controller builds the
``PoolTransfer`` objects), else local copies with the same names, fields and methods.

SGLang's ``HiCacheStorage`` (``sglang.srt.mem_cache.hicache_storage``) has three call
families: v0 (``get``/``set``/``batch_get``/``batch_set``/``exists`` with page tensors),
v1 (``batch_get_v1``/``batch_set_v1`` with host-pool indices) and v2
(``batch_exists_v2``/``batch_get_v2``/``batch_set_v2`` with one ``PoolTransfer`` per
host pool: the KV pool and the extra pools of hybrid models, Mamba states, SWA and
DSA indexer pages, registered through ``register_mem_host_pool_v2``).
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from enum import Enum
from typing import Any


class _PoolName(str, Enum):
    """Names of SGLang's host pools (``PoolTransfer.name``)."""

    KV = "kv"
    MAMBA = "mamba"
    SWA = "swa"
    INDEXER = "indexer"
    DEEPSEEK_V4_C4 = "deepseek_v4_c4"
    DEEPSEEK_V4_C4_INDEXER = "deepseek_v4_c4_indexer"
    DEEPSEEK_V4_C128 = "deepseek_v4_c128"
    DEEPSEEK_V4_C4_STATE = "deepseek_v4_c4_state"
    DEEPSEEK_V4_C4_INDEXER_STATE = "deepseek_v4_c4_indexer_state"
    DEEPSEEK_V4_C128_STATE = "deepseek_v4_c128_state"
    DRAFT = "draft"
    DRAFT_INDEXER = "draft_indexer"
    DRAFT_SWA = "draft_swa"

    def __str__(self) -> str:
        return str(self.value)


class _PoolHitPolicy(str, Enum):
    """How ``batch_exists_v2`` counts an extra pool's pages: every page of the KV prefix
    must be stored (``all_pages``: DSA) or only its last ones (``trailing_pages``:
    Mamba and SWA states, which cover the end of a prefix)."""

    ALL_PAGES = "all_pages"
    TRAILING_PAGES = "trailing_pages"


@dataclass
class _HiCacheStorageExtraInfo:
    """What SGLang adds to a call: the keys of the prefix before these pages, and more."""

    prefix_keys: list[str] | None = None
    extra_info: dict[str, Any] | None = None


@dataclass
class _PoolTransfer:
    """One pool's part of a v2 call: ``keys`` (one per page) and ``host_indices`` (token
    indices into the pool, ``page_size`` per page) for host <-> storage."""

    name: Any
    host_indices: Any | None = None
    device_indices: Any | None = None
    keys: list[str] | None = None
    hit_policy: Any = _PoolHitPolicy.ALL_PAGES
    nodes_to_load: list[Any] | None = None
    indices_from_pool: Any | None = None


@dataclass
class _PoolTransferResult:
    """``batch_exists_v2``'s answer: the usable KV prefix in pages, and the pages found
    per pool."""

    kv_hit_pages: int
    extra_pool_hit_pages: dict[str, int]

    @classmethod
    def empty(cls) -> _PoolTransferResult:
        return cls(0, {})

    def update_kv_hit_pages(self, kv_hit_pages: int) -> None:
        self.kv_hit_pages = max(self.kv_hit_pages, kv_hit_pages)

    def update_extra_pool_hit_pages(self, results: dict[str, int]) -> None:
        self.extra_pool_hit_pages.update(results)


class _HiCacheStorageInterface(abc.ABC):
    """SGLang's ``HiCacheStorage`` methods, for when SGLang is not installed."""

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        if not hasattr(self, "registered_pools"):
            self.registered_pools: dict[Any, Any] = {}
        self.registered_pools[host_pool_name] = host_pool

    def batch_exists_v2(self, keys: list[str], pool_transfers: list[Any] | None = None,
                        extra_info: Any | None = None) -> Any:
        raise NotImplementedError()

    def batch_get_v2(self, transfers: list[Any],
                     extra_info: Any | None = None) -> dict[str, list[bool]]:
        raise NotImplementedError()

    def batch_set_v2(self, transfers: list[Any],
                     extra_info: Any | None = None) -> dict[str, list[bool]]:
        raise NotImplementedError()

    def batch_get_v1(self, keys: list[str], host_indices: Any,
                     extra_info: Any | None = None) -> list[bool]:
        raise NotImplementedError()

    def batch_set_v1(self, keys: list[str], host_indices: Any,
                     extra_info: Any | None = None) -> list[bool]:
        raise NotImplementedError()

    @abc.abstractmethod
    def get(self, key: str, target_location: Any | None = None,
            target_sizes: Any | None = None) -> Any | None: ...

    @abc.abstractmethod
    def batch_get(self, keys: list[str], target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> list[Any | None] | int: ...

    @abc.abstractmethod
    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool: ...

    @abc.abstractmethod
    def batch_set(self, keys: list[str], values: Any | None = None,
                  target_locations: Any | None = None, target_sizes: Any | None = None) -> bool: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    def batch_exists(self, keys: list[str], extra_info: Any | None = None) -> int:
        for i, k in enumerate(keys):
            if not self.exists(k):
                return i
        return len(keys)

    def clear(self) -> None:
        return None

    def get_stats(self) -> Any:
        return None


try:  # SGLang's factory requires a subclass of its own HiCacheStorage.
    _sglang: Any = importlib.import_module("sglang.srt.mem_cache.hicache_storage")
except Exception:  # SGLang absent (or broken): the same interface, locally
    _sglang = None
# Each name is SGLang's where its version has it (the v2 types are recent), else ours.
HiCacheStorageBase: Any = getattr(_sglang, "HiCacheStorage", _HiCacheStorageInterface)
PoolName: Any = getattr(_sglang, "PoolName", _PoolName)
PoolHitPolicy: Any = getattr(_sglang, "PoolHitPolicy", _PoolHitPolicy)
PoolTransfer: Any = getattr(_sglang, "PoolTransfer", _PoolTransfer)
PoolTransferResult: Any = getattr(_sglang, "PoolTransferResult", _PoolTransferResult)
HiCacheStorageExtraInfo: Any = getattr(_sglang, "HiCacheStorageExtraInfo",
                                       _HiCacheStorageExtraInfo)

__all__ = ["HiCacheStorageBase", "HiCacheStorageExtraInfo", "PoolHitPolicy", "PoolName",
           "PoolTransfer", "PoolTransferResult"]

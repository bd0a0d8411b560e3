"""The base class of the backend: SGLang's ``HiCacheStorage`` when SGLang is installed
(its factory checks the subclass), else a local copy of the same abstract interface."""

from __future__ import annotations

import abc
from typing import Any


class _HiCacheStorageInterface(abc.ABC):
    """SGLang's ``HiCacheStorage`` abstract methods, for when SGLang is not installed."""

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        self.mem_pool_host = mem_pool_host

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
    from sglang.srt.mem_cache.hicache_storage import (
        HiCacheStorage as HiCacheStorageBase,
    )
except Exception:  # SGLang absent (or broken): the same interface, locally
    HiCacheStorageBase = _HiCacheStorageInterface

__all__ = ["HiCacheStorageBase"]

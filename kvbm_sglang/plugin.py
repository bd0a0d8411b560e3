"""Registers the SGLang HiCache storage backend. Imports only kvbm and the stdlib."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import ConnectorRegistry


@hookimpl
def kvbm_register_connectors(registry: ConnectorRegistry) -> None:
    """Add the ``sglang`` connector: a HiCache storage backend over a ``KvBlockManager``."""
    registry.add("sglang", factory="kvbm_sglang.storage:KvbmHiCacheStorage", extra="torch",
                 requires=("torch",), description="SGLang HiCache storage backend")

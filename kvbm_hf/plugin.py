"""Registers the Hugging Face transformers connector. Imports only kvbm and the stdlib."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import ConnectorRegistry


@hookimpl
def kvbm_register_connectors(registry: ConnectorRegistry) -> None:
    """Add the ``hf`` connector: a transformers ``Cache`` over a ``KvBlockManager``."""
    registry.add("hf", factory="kvbm_hf.cache:KvbmCache", extra="hf",
                 requires=("torch", "transformers"),
                 description="Hugging Face transformers: a Cache that reuses cached prefixes")

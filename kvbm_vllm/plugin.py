"""Registers kvbm's vLLM connector. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import ConnectorRegistry


@hookimpl
def kvbm_register_connectors(registry: ConnectorRegistry) -> None:
    registry.add("vllm", factory="kvbm_vllm.connector:KvbmConnector", extra="vllm",
                 requires=("torch", "vllm"), description="vLLM KVConnectorBase_V1")

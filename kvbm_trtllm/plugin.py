"""Registers kvbm's TensorRT-LLM connector. Imports only kvbm and the standard library."""

from __future__ import annotations

from kvbm.hookspecs import hookimpl
from kvbm.plugins import ConnectorRegistry


@hookimpl
def kvbm_register_connectors(registry: ConnectorRegistry) -> None:
    # The connector is a pair of classes TRT-LLM instantiates itself (leader in the
    # scheduler, worker per rank); the factory names the leader, the module holds both.
    registry.add("trtllm", factory="kvbm_trtllm.connector:DynamoKVBMConnectorLeader",
                 requires=("torch", "tensorrt_llm"),
                 description="TensorRT-LLM KvCacheConnectorScheduler / KvCacheConnectorWorker")

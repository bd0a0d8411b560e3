"""kvbm's vLLM connector under the module path users type (``kv_connector_module_path``).

The connector lives in the plugin package ``kvbm_vllm``; this module only re-exports it.
"""

from __future__ import annotations

from kvbm_vllm.connector import (
    EngineLayout,
    KvbmConnector,
    KvbmConnectorMetadata,
    KvbmHandshakeMetadata,
    KvbmWorkerMetadata,
    SchedulerSide,
    WorkerSide,
    connector_settings,
    engine_layout,
)

__all__ = [
    "EngineLayout",
    "KvbmConnector",
    "KvbmConnectorMetadata",
    "KvbmHandshakeMetadata",
    "KvbmWorkerMetadata",
    "SchedulerSide",
    "WorkerSide",
    "connector_settings",
    "engine_layout",
]

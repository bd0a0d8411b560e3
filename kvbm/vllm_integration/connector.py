"""``DynamoConnector``: Dynamo KVBM's connector name, resolved to kvbm's vLLM connector.

kvbm reads Dynamo's ``DYN_KVBM_*`` variables (``DYN_KVBM_CPU_CACHE_GB``,
``DYN_KVBM_DISK_CACHE_GB``, ``DYN_KVBM_DISK_CACHE_DIR`` …) as aliases of its own
settings, so a KVBM deployment switches by installing kvbm and nothing else.
"""

from __future__ import annotations

from kvbm_vllm.connector import KvbmConnector, KvbmConnectorMetadata, KvbmWorkerMetadata


class DynamoConnector(KvbmConnector):
    """kvbm's ``KvbmConnector`` under the name Dynamo's documentation uses."""


DynamoConnectorMetadata = KvbmConnectorMetadata

__all__ = ["DynamoConnector", "DynamoConnectorMetadata", "KvbmWorkerMetadata"]

"""kvbm's TensorRT-LLM connector under the module path Dynamo's configuration names.

The connector lives in the plugin package ``kvbm_trtllm``; this module only re-exports it.
"""

from __future__ import annotations

from kvbm_trtllm.connector import (
    DynamoKVBMConnectorLeader,
    DynamoKVBMConnectorWorker,
    KvbmLoadError,
    KvbmTrtllmMetadata,
)

__all__ = [
    "DynamoKVBMConnectorLeader",
    "DynamoKVBMConnectorWorker",
    "KvbmLoadError",
    "KvbmTrtllmMetadata",
]
